"""`cpis-bridge serve --workers N`: N real processes on one port sharing one embedded Redis, each answering; a worker
killed with -9 is replaced; SIGTERM stops every worker and the Redis; bad counts and port 0 are refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.polling import wait_until
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def workers_of(pid: int) -> set[int]:
    return {c for c in children(pid) if "cpis_bridge" in cmdline(c)}


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def serving_workers(port: int, workers: set[int], connections: int = 24) -> set[int]:
    """The workers holding at least one of ``connections`` kept-alive connections to ``port`` (each answered once):
    the kernel spreads new connections over the SO_REUSEPORT listeners, so both show up unless one is not serving."""
    held = []
    try:
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1"), "no answer"
            held.append(s)
        ours = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    ours.add(fields[9])  # the server side of an established connection to our port
        return {pid for pid in workers if socket_inodes(pid) & ours}
    finally:
        for s in held:
            s.close()


def test_two_workers_share_the_port_replace_a_killed_one_and_stop_together(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path / "var", args=["--workers", "2"])
    svc.start(timeout=60)
    try:
        assert svc.proc is not None
        wait_until(lambda: len(workers_of(svc.proc.pid)) == 2, timeout=60, what="two workers")
        first = workers_of(svc.proc.pid)
        redis_pid = svc.redis_pid()
        assert redis_pid in children(svc.proc.pid), "the supervisor, not a worker, owns the embedded Redis"
        wait_until(lambda: serving_workers(svc.port, first) == first, timeout=60, what="both workers answering")

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(workers_of(svc.proc.pid)) == 2 and victim not in workers_of(svc.proc.pid),
            timeout=60,
            what="the killed worker replaced",
        )
        wait_until(lambda: svc.status("/readyz") == 200, timeout=60, what="ready after the restart")
        assert svc.output().count("workers.exited") == 1
    finally:
        code = svc.terminate(timeout=60)
    assert code == 0, svc.output()[-3000:]
    for pid in (*first, redis_pid):
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid), timeout=10)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_worker_counts_are_refused(value: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cpis_bridge", "serve", "--workers", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "--workers" in out.stderr and "positive number" in out.stderr


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path / "var", args=["--workers", "2"], env={"CPIS_PORT": "0"})
    svc.spawn()
    assert svc.proc is not None
    started = time.monotonic()
    assert svc.proc.wait(60) == 2
    assert time.monotonic() - started < 60
    assert "fixed port" in svc.output()
