"""Flag sync against a local FHIR server double running in its own process, real Redis, one relay. Prints one JSON
line (also written to $BENCH_RESULT_JSON when set) with three measurements:

- initial sync: 10,000 records queued, drained with batch Bundles, then 2,000 with single PUTs for comparison;
- recovery: the server goes away for 60 s while 2,000 changes are made, then comes back with a write pace (200
  writes/s, one at a time, 409 when more than 4 conditional writes overlap, no updateCreate declared): seconds from
  its return (first answer) to in sync, against its own time for 2,000 writes at that pace (target <= 1.5x);
- rate limited: a 120 requests/minute limit told only by RateLimit headers (no Retry-After), with its window scaled
  from 60 s to 6 s (12 requests per 6 s: the same rate, ten times as many window resets per change), no batch, 150
  changes: requests sent per change (target <= 1.1).

    .venv/bin/python -m bench.sync_throughput [--records 10000] [--singles 2000] [--pending 2000] [--outage 60]
        [--limited 150]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parent.parent


def _serve_double(port: int, batch: bool, behaviour: dict[str, Any] | None = None) -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.support.fhir_double import FhirDouble

    async def main() -> None:
        behaviour_ = dict(behaviour or {})
        double = FhirDouble(batch=batch, update_create=behaviour_.pop("update_create", True))
        for name, value in behaviour_.items():
            setattr(double, name, value)

        async def cpu(request: web.Request) -> web.Response:
            return web.json_response({"cpu": time.process_time()})

        async def stats(request: web.Request) -> web.Response:
            statuses: dict[str, int] = {}
            for *_x, status in double.requests:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            return web.json_response(
                {
                    "requests": sum(1 for r in double.requests if r[2] != "metadata"),
                    "statuses": statuses,
                    "flags": len(double.flags),
                    "busy_s": double.busy_s,
                }
            )

        double.app.router.add_get("/cpu", cpu)
        double.app.router.add_get("/stats", stats)
        runner = web.AppRunner(double.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


async def _wait_up(url: str, step_s: float = 0.05) -> float:
    """Wait until the double answers; returns when it first did (perf_counter)."""
    async with aiohttp.ClientSession() as s:
        for _ in range(int(10 / step_s)):
            try:
                async with s.get(f"{url}/metadata") as r:
                    if r.status == 200:
                        return time.perf_counter()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(step_s)
    raise RuntimeError("double did not start")


def _start_double(port: int, batch: bool, behaviour: dict[str, Any] | None = None) -> multiprocessing.Process:
    proc = multiprocessing.Process(target=_serve_double, args=(port, batch, behaviour), daemon=True)
    proc.start()
    return proc


async def _stats(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/stats") as r:
        return dict(await r.json())


@contextlib.asynccontextmanager
async def _service(
    base: str, redis_url: str, data_dir: Path, tag: str, **overrides: Any
) -> AsyncIterator[tuple[Any, Callable[[int, str], Awaitable[None]]]]:
    """The app (relays off) on ``base``, its Flag sync parts and a way to write n records (prefix): the bench's
    own service; its Redis keys are deleted afterwards."""
    from cpis_bridge.app import KEYS, REDIS, SCRIPTS, create_app
    from cpis_bridge.compose import flag_sync_parts
    from cpis_bridge.config import Settings
    from cpis_bridge.core.audit import AuditContext
    from cpis_bridge.core.nhs import iter_test_numbers
    from cpis_bridge.core.principal import Principal, Role
    from cpis_bridge.web.state import SERVICES

    settings = Settings(
        _env_file=None,
        redis_url=redis_url,
        key_prefix=f"bench{os.getpid()}{tag}",  # type: ignore[call-arg]
        data_dir=data_dir,
        fhir_base_url=base,
        relays=False,
        log_hash_key="bench-key",
        auth_dev_secret="bench-secret-0123456789012345678901234",
        **overrides,
    )
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = AuditContext(
        Principal(subject="bench", role=Role.LOCAL_AUTHORITY, ods="LA001", name="Bench", role_code="R0001")
    )
    numbers = iter_test_numbers()

    async def put(n: int, prefix: str) -> None:
        bodies = [
            {
                "localId": f"{prefix}{i}",
                "planType": "CPP",
                "nhsNumber": str(next(numbers)),
                "dateOfBirth": "2016-04-02",
                "startDate": "2026-01-10",
            }
            for i in range(n)
        ]
        for i in range(0, n, 200):
            await asyncio.gather(
                *(app[SERVICES].records.put(ctx, "LA001", b["localId"], b) for b in bodies[i : i + 200])
            )

    try:
        async with aiohttp.ClientSession() as session:
            parts = flag_sync_parts(settings, app[REDIS], app[KEYS], app[SCRIPTS], session)
            await parts.queue.ensure_group()
            parts.relay.block_ms = 10
            yield parts, put
        keys = [k async for k in app[REDIS].scan_iter(match=f"{settings.key_prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await app[REDIS].delete(*keys[i : i + 500])
    finally:
        await runner.cleanup()


async def _drain(parts: Any, bound_s: float = 900.0) -> None:
    from cpis_bridge.core.clock import epoch_ms, utc_now

    deadline = time.perf_counter() + bound_s
    while time.perf_counter() < deadline:
        pending, _ = await parts.queue.stats(epoch_ms(utc_now()))
        if pending == 0:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("the sync queue did not drain")


async def run_case(records: int, batch: bool, redis_url: str, data_dir: Path) -> dict[str, Any]:
    from cpis_bridge.core.clock import epoch_ms, utc_now

    port = free_port()
    proc = _start_double(port, batch)
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        await _wait_up(base)
        async with _service(base, redis_url, data_dir, str(int(batch))) as (parts, put):
            await put(records, "B-")
            await parts.server.prepare()
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/cpu") as r:
                    server_cpu0 = (await r.json())["cpu"]
                cpu0, t0 = time.process_time(), time.perf_counter()
                for _ in range(100_000):
                    await parts.relay.run_once()
                    pending, _ = await parts.queue.stats(epoch_ms(utc_now()))
                    if pending == 0:
                        break
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                async with session.get(f"http://127.0.0.1:{port}/cpu") as r:
                    server_cpu = (await r.json())["cpu"] - server_cpu0
            dead = len(await parts.queue.dead_letters())
        return {
            "mode": "batch" if batch else "single",
            "records": records,
            "seconds": round(seconds, 3),
            "records_per_s": round(records / seconds),
            "relay_cpu_share": round(cpu / seconds, 2),
            "server_cpu_share": round(server_cpu / seconds, 2),
            "dead": dead,
        }
    finally:
        proc.kill()
        proc.join(5)


async def own_time(base: str, n: int, bundle: int = 100, in_flight: int = 2) -> float:
    """The server's own time for ``n`` conditional Flag writes, sent by a plain client that only keeps it busy
    (Bundles of 100, two at a time, nothing else to do): what the relay's recovery is compared with."""
    from cpis_bridge.fhir.flag_sync import IDENTIFIER_SYSTEM, conditional_url

    def entry(i: int) -> dict[str, Any]:
        key = f"OWN|{i}"
        flag = {
            "resourceType": "Flag",
            "status": "active",
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
            "code": {"text": "bench"},
            "subject": {"identifier": {"value": "9990000018"}},
        }
        return {"resource": flag, "request": {"method": "PUT", "url": conditional_url("OWN", str(i))}}

    bodies = [
        json.dumps(
            {"resourceType": "Bundle", "type": "batch", "entry": [entry(i) for i in range(j, min(n, j + bundle))]}
        ).encode()
        for j in range(0, n, bundle)
    ]
    gate = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession() as s:

        async def send(body: bytes) -> None:
            async with gate, s.post(base, data=body, headers={"Content-Type": "application/fhir+json"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"own-time Bundle answered {r.status}")

        t0 = time.perf_counter()
        await asyncio.gather(*(send(b) for b in bodies))
        return time.perf_counter() - t0


async def recovery_case(pending: int, outage_s: float, pace: float, redis_url: str, data_dir: Path) -> dict[str, Any]:
    """The relay runs throughout; the server is killed, ``pending`` changes are made, it is started again after
    ``outage_s``: seconds from its first answer to in sync, against its own time for that many writes."""
    behaviour = {"pace": pace, "conflict_above": 4, "update_create": False, "declared_update_create": False}
    port = free_port()
    proc = _start_double(port, True, behaviour)
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        await _wait_up(base)
        async with _service(
            base, redis_url, data_dir, "out", delivery_first_retry_s=1.0, delivery_max_backoff_s=60.0
        ) as (parts, put):
            stop = asyncio.Event()
            relay = asyncio.create_task(parts.relay.run(stop))
            try:
                await put(5, "W-")  # the relay is warm: write mode chosen, connections open
                await _drain(parts, 60)
                proc.kill()
                proc.join(5)
                down = time.perf_counter()
                await put(pending, "O-")
                await asyncio.sleep(max(0.0, down + outage_s - time.perf_counter()))
                proc = _start_double(port, True, behaviour)
                back = await _wait_up(base, step_s=0.01)
                await _drain(parts)
                seconds = time.perf_counter() - back
            finally:
                stop.set()
                await relay
            stats = await _stats(port)
            dead = len(await parts.queue.dead_letters())
            mode = parts.server.mode
        own = await own_time(base, pending)  # measured the same way, on the same machine, right after
        return {
            "case": "recovery",
            "pending": pending,
            "outage_s": outage_s,
            "write_mode": mode,
            "server_pace_writes_per_s": pace,
            "server_nominal_s": round(pending / pace, 3),
            "server_own_s": round(own, 3),
            "seconds_from_return_to_in_sync": round(seconds, 3),
            "ratio": round(seconds / own, 2),
            "target_ratio": 1.5,
            "flags": stats["flags"],
            "requests": stats["requests"],
            "statuses": stats["statuses"],
            "dead": dead,
        }
    finally:
        proc.kill()
        proc.join(5)


async def rate_limited_case(
    changes: int, quota: int, window_s: float, redis_url: str, data_dir: Path
) -> dict[str, Any]:
    """Single writes (no batch declared) under a limit told only by RateLimit headers: requests per change."""
    behaviour = {"rate_limit": (quota, window_s), "rate_style": "structured"}
    port = free_port()
    proc = _start_double(port, False, behaviour)
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        await _wait_up(base)
        async with _service(base, redis_url, data_dir, "rl", fhir_write_mode="id") as (parts, put):
            await put(changes, "L-")
            await parts.server.prepare()
            stop = asyncio.Event()
            t0 = time.perf_counter()
            relay = asyncio.create_task(parts.relay.run(stop))
            try:
                await _drain(parts)
            finally:
                stop.set()
                await relay
            seconds = time.perf_counter() - t0
            stats = await _stats(port)
            dead = len(await parts.queue.dead_letters())
        return {
            "case": "rate-limited",
            "changes": changes,
            "limit": f"{quota} per {window_s:g} s ({quota * 60 / window_s:g}/minute)",
            "seconds": round(seconds, 1),
            "requests": stats["requests"],
            "requests_per_change": round(stats["requests"] / changes, 3),
            "target_requests_per_change": 1.1,
            "statuses": stats["statuses"],
            "flags": stats["flags"],
            "dead": dead,
        }
    finally:
        proc.kill()
        proc.join(5)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--singles", type=int, default=2_000)
    parser.add_argument("--pending", type=int, default=2_000, help="changes made during the outage (0: skip)")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the server is away")
    parser.add_argument("--pace", type=float, default=200.0, help="the server's writes per second")
    parser.add_argument("--limited", type=int, default=150, help="changes under the rate limit (0: skip)")
    parser.add_argument("--quota", type=int, default=12, help="requests per window (12 per 6 s = 120/minute)")
    parser.add_argument("--window", type=float, default=6.0)
    args = parser.parse_args()
    from cpis_bridge.store.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp:
        redis_url = os.environ.get("CPIS_REDIS_URL")
        embedded = None
        if not redis_url:
            embedded = EmbeddedRedis(Path(tmp) / "redis")
            embedded.start()
            redis_url = embedded.url
        var = Path(tmp) / "var"
        try:
            cases = [await run_case(args.records, True, redis_url, var)] if args.records else []
            if args.singles:
                cases.append(await run_case(args.singles, False, redis_url, var))
            if args.pending:
                cases.append(await recovery_case(args.pending, args.outage, args.pace, redis_url, var))
            if args.limited:
                cases.append(await rate_limited_case(args.limited, args.quota, args.window, redis_url, var))
        finally:
            if embedded is not None:
                embedded.stop()
    result = {"bench": "flag-sync", "cpus": os.cpu_count(), "cases": cases}
    print(json.dumps(result))
    if os.environ.get("BENCH_RESULT_JSON"):
        Path(os.environ["BENCH_RESULT_JSON"]).write_text(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
