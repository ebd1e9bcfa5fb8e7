"""``cpis-bridge serve --workers N``: N service processes on one port (SO_REUSEPORT), started and supervised here.

Everything the workers must share is made once, here, before any of them starts: the generated secrets (two workers
generating their own hash key would file the same child under two keys) and the embedded Redis (two workers would
each start one on the same data directory). The workers share the relays, the Flag sync and the scheduler through
the consumer groups and leases a multi-replica deployment already uses (docs/architecture.md). A worker that dies is
started again (backoff doubling to 30 s); SIGTERM or SIGINT is passed on to every worker, which drains as one process
would, and the embedded Redis stops last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from cpis_bridge.bootstrap import dev_secret, hash_key
from cpis_bridge.config import Settings
from cpis_bridge.core.backoff import Backoff
from cpis_bridge.store.embedded import EmbeddedRedis, socket_answers

log = logging.getLogger("cpis_bridge.workers")

RESTART_MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 10.0  # a worker that ran this long before dying restarts at once (its failures are not a streak)


def worker_count(value: str) -> int:
    """``--workers``: a positive number, or ``auto`` for the CPU cores this process may run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of workers or 'auto', got {value!r}")
    return count


class Workers:
    """The supervisor: one asyncio subprocess per worker slot, restarted when it exits unasked."""

    def __init__(self, settings: Settings, count: int, env: dict[str, str]):
        self.settings = settings
        self.count = count
        self.env = env
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    async def start(self, slot: int) -> None:
        self.procs[slot] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cpis_bridge", "serve", env=self.env
        )
        log.info("workers.started", extra={"slot": slot, "pid": self.procs[slot].pid})

    async def keep(self, slot: int) -> None:
        """Run one slot until stopping: start its worker, and start it again whenever it exits unasked."""
        backoff = Backoff(1.0, RESTART_MAX_BACKOFF_S)
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            started = loop.time()
            await self.start(slot)
            code = await self.procs[slot].wait()
            if self.stopping.is_set():
                return
            if loop.time() - started >= HEALTHY_AFTER_S:
                backoff.reset()
                delay = 0.0
            else:
                delay = backoff.next()
            log.error("workers.exited", extra={"slot": slot, "code": code, "restartInS": round(delay, 2)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def stop(self) -> None:
        """Pass SIGTERM to every worker; after the drain and grace periods (plus 5 s), kill what is left."""
        self.stopping.set()
        alive = [p for p in self.procs.values() if p.returncode is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        limit = self.settings.drain_delay_s + self.settings.shutdown_grace_s + 5.0
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in alive)), limit)
        except TimeoutError:
            for proc in alive:
                if proc.returncode is None:
                    log.error("workers.killed", extra={"pid": proc.pid})
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in alive))


async def run_workers(settings: Settings, count: int) -> int:
    """Serve with ``count`` worker processes until SIGTERM or SIGINT; 0 when every worker stopped cleanly."""
    if settings.port == 0:
        log.error("workers.port_zero")
        print("cpis-bridge: --workers needs a fixed port (CPIS_PORT), not 0", file=sys.stderr)
        return 2
    hash_key(settings)  # generated once, before the workers read it
    if settings.dev_mode:
        dev_secret(settings)
    env = dict(os.environ, CPIS_REUSE_PORT="true", CPIS_HOST=settings.host, CPIS_PORT=str(settings.port))
    embedded: EmbeddedRedis | None = None
    supervisor: asyncio.Task[None] | None = None
    if not settings.redis_url:
        candidate = EmbeddedRedis(settings.data_dir)
        if not socket_answers(candidate.socket_path):
            await asyncio.to_thread(candidate.start)
            embedded = candidate
            supervisor = asyncio.create_task(embedded.supervise(), name="embedded-redis")
        env["CPIS_REDIS_URL"] = candidate.url
    workers = Workers(settings, count, env)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("workers.serving", extra={"workers": count, "port": settings.port})
    keepers = asyncio.gather(*(workers.keep(slot) for slot in range(count)))
    try:
        await stop.wait()
        await workers.stop()
        await keepers
    finally:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    codes = [p.returncode for p in workers.procs.values()]
    log.info("workers.stopped", extra={"codes": codes})
    # A worker still starting when the stop came ends by our SIGTERM itself (before its handler is installed): it
    # had served nothing, so that counts as a clean stop too.
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1
