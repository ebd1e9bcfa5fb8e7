"""Real Redis/Valkey servers on loopback TCP for the high-availability tests: primaries, replicas and Sentinels
started from one server binary (the embedded store's: a ``redis-server`` or ``valkey-server``), each in its own
directory, killed or frozen on purpose, always stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis as redis_sync

from cpis_bridge.store.embedded import find_server_binary
from tests.support.polling import free_port

MASTER = "cpis-primary"


def server_binary() -> str | None:
    try:
        return find_server_binary()
    except RuntimeError:
        return None


class Node:
    """One server process: a data node (``replica_of`` = primary's port) or a Sentinel (``sentinel`` = primary's
    port to monitor)."""

    def __init__(
        self,
        directory: Path,
        *,
        binary: str | None = None,
        replica_of: int | None = None,
        sentinel: int | None = None,
        quorum: int = 2,
        down_after_ms: int = 1000,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.dir = directory
        self.binary = binary or find_server_binary()
        self.port = free_port()
        self.replica_of = replica_of
        self.sentinel = sentinel
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    def _args(self) -> list[str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        common = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--daemonize", "no"]
        common += ["--logfile", str(self.dir / "server.log"), "--save", ""]
        if self.sentinel is not None:
            conf = self.dir / "sentinel.conf"
            if not conf.exists():  # Sentinel rewrites it with what it learns; a restart keeps that
                conf.write_text(
                    f"sentinel monitor {MASTER} 127.0.0.1 {self.sentinel} {self.quorum}\n"
                    f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {MASTER} 10000\n"
                    f"sentinel parallel-syncs {MASTER} 2\n"
                )
            return [self.binary, str(conf), "--sentinel", *common, *self.extra]
        args = [self.binary, *common, "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return [*args, *self.extra]

    def start(self, timeout: float = 10.0) -> Node:
        self.process = subprocess.Popen(
            self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(redis_sync.RedisError):
                if self.client(timeout=0.5).ping():
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"server on {self.port} did not start")

    def client(self, timeout: float = 5.0) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port, socket_timeout=timeout, decode_responses=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def role(self) -> str:
        return str(self.client(timeout=1).info("replication")["role"])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.thaw()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_until(check: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis_sync.RedisError, OSError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {getattr(check, '__name__', check)}")
        time.sleep(interval)


def in_sync(primary: Node, replicas: list[Node]) -> bool:
    """Every replica is connected and has the primary's whole replication stream."""
    info = primary.client(timeout=1).info("replication")
    offset = int(info["master_repl_offset"])
    states = [info.get(f"slave{i}", {}) for i in range(int(info["connected_slaves"]))]
    online = [s for s in states if isinstance(s, dict) and s.get("state") == "online"]
    return len(online) >= len(replicas) and all(int(s["offset"]) >= offset for s in online)
