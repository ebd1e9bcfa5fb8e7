"""Runs `cpis-bridge serve` as a real subprocess for process-level tests (kill -9, SIGTERM, logs, several relays on
one Redis): its environment from the test world, readiness by /readyz, stopping by its own PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.polling import free_port, http_status, wait_ready, wait_ready_async
from tests.support.world import DEV_SECRET, HASH_KEY, REGISTRY


class ServiceProcess:
    """One `cpis-bridge serve` process; without redis_url it runs its own embedded Redis under data_dir. ``env``
    adds to (or overrides) the test world's settings; the parent's CPIS_* variables are never inherited."""

    def __init__(
        self,
        data_dir: Path,
        *,
        redis_url: str | None = None,
        key_prefix: str = "cpis",
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CPIS_")}
        self.env.update(
            {
                "CPIS_PORT": str(self.port),
                "CPIS_DATA_DIR": str(data_dir),
                "CPIS_REGISTRY": str(REGISTRY),
                "CPIS_AUTH_DEV_SECRET": DEV_SECRET,
                "CPIS_LOG_HASH_KEY": HASH_KEY,
                "CPIS_KEY_PREFIX": key_prefix,
            }
        )
        if redis_url:
            self.env["CPIS_REDIS_URL"] = redis_url
        self.env.update(env or {})
        self.args = args or []  # after `serve` (e.g. --workers 2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"service-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> ServiceProcess:
        """Start the process without waiting for it to be ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cpis_bridge", "serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        """Start and block until /readyz answers 200 (RuntimeError with the log's tail if it exits or is late)."""
        self.spawn()
        try:
            wait_ready(self.url, self.proc, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.output()[-3000:]}") from None
        return self

    async def start_async(self, timeout: float = 30.0) -> ServiceProcess:
        """``start`` without blocking the event loop (for tests whose receivers run in it)."""
        self.spawn()
        try:
            await wait_ready_async(self.url, self.proc, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.output()[-3000:]}") from None
        return self

    def status(self, path: str) -> int | None:
        return http_status(self.url + path)

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def redis_pid(self) -> int:
        return int((self.data_dir / "redis.pid").read_text().strip())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
