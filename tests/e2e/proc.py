"""Runs `cpis-bridge serve` as a real subprocess for process-level tests (kill -9, SIGTERM, logs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import DEV_SECRET, HASH_KEY, REGISTRY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """One `cpis-bridge serve` process; without redis_url it runs its own embedded Redis under data_dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        redis_url: str | None = None,
        key_prefix: str = "cpis",
        env: dict[str, str] | None = None,
        port: int | None = None,
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
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"service-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cpis_bridge", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            if self.status("/readyz") == 200:
                return self
            time.sleep(0.05)
        raise RuntimeError("service did not become ready")

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def redis_pid(self) -> int:
        return int((self.data_dir / "redis.pid").read_text().strip())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
