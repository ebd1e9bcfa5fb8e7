"""Driving wrk (closed loop, its own process) with bench/lua/requests.lua and reading its JSON summary line."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.procs import BenchError

SCRIPT = Path(__file__).parent / "lua" / "requests.lua"
INSTALL_HINT = "wrk is not installed: `apt-get install -y wrk` (Debian package), then re-run `make bench`"


def wrk_binary() -> str | None:
    return shutil.which("wrk")


@dataclass
class Load:
    """What to send: lines of BENCH_LIST (paths, or NHS numbers for Encounter bodies) and the auth header."""

    url: str  # base URL, e.g. http://127.0.0.1:8080
    lines_file: Path
    mode: str = "get"  # get | encounter
    auth: str = ""
    unscheduled: bool = True
    repeat: int = 1
    total: int = 0  # > 0: stop after this many responses (the memory walk)


@dataclass
class RunResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    raw: dict[str, Any] = field(default_factory=dict)


def run_wrk(
    load: Load, *, seconds: float, connections: int = 32, threads: int = 1, timeout_s: float = 5.0, label: str = ""
) -> RunResult:
    binary = wrk_binary()
    if binary is None:
        raise BenchError(INSTALL_HINT)
    env = dict(os.environ)
    env.update(
        BENCH_LIST=str(load.lines_file),
        BENCH_MODE=load.mode,
        BENCH_AUTH=load.auth,
        BENCH_THREADS=str(threads),
        BENCH_RUN=(label or "run") + "-" + uuid.uuid4().hex[:8],
        BENCH_REPEAT=str(load.repeat),
        BENCH_UNSCHEDULED="true" if load.unscheduled else "false",
    )
    if load.total:
        env["BENCH_TOTAL"] = str(load.total)
    duration = max(1, round(seconds))
    args = [
        binary,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--timeout",
        f"{timeout_s:g}s",
        "-s",
        str(SCRIPT),
        load.url,
    ]
    if load.total:
        returncode, stdout, stderr = _run_until_done(args, env, threads, duration)
    else:
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=duration + 120, check=False)
        returncode, stdout, stderr = out.returncode, out.stdout, out.stderr
    line = next((x for x in stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if returncode != 0 or line is None:
        raise BenchError(f"wrk failed (code {returncode}): {stderr.strip() or stdout.strip()}")
    raw: dict[str, Any] = orjson.loads(line.removeprefix("BENCH_JSON "))
    secs = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts"))
    return RunResult(
        rps=raw["requests"] / secs if secs else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        requests=raw["requests"],
        errors=errors,
        raw=raw,
    )


def _run_until_done(args: list[str], env: dict[str, str], threads: int, bound_s: int) -> tuple[int, str, str]:
    """Run wrk until every thread has sent its share (it writes BENCH_DONE.<n>), then SIGINT it for its summary."""
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        marker = Path(tmp) / "done"
        env = dict(env, BENCH_DONE=str(marker))
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + bound_s
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if all(Path(f"{marker}.{n}").exists() for n in range(1, threads + 1)):
                    break
                time.sleep(0.1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, stdout, stderr


@dataclass
class CaseResult:
    rps: float
    p50_ms: float
    p99_ms: float
    runs: list[RunResult]

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)


def _summary(results: list[RunResult]) -> CaseResult:
    return CaseResult(
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        runs=results,
    )


def measure(
    load: Load, *, seconds: float, warmup: float, runs: int, label: str, baseline: Load | None = None
) -> tuple[CaseResult, CaseResult | None]:
    """A warm-up, then ``runs`` timed runs; req/s, p50 and p99 are each the median over the runs.

    With ``baseline``, each timed run of the case is paired with a baseline run just before it, so a noisy
    neighbour on a shared machine weighs on both sides of the ratio alike.
    """
    if warmup > 0:
        if baseline is not None:
            run_wrk(baseline, seconds=warmup, label=label + "-bwarm")
        run_wrk(load, seconds=warmup, label=label + "-warm")
    results, base = [], []
    for i in range(runs):
        if baseline is not None:
            base.append(run_wrk(baseline, seconds=seconds, label=f"{label}-b{i}"))
        results.append(run_wrk(load, seconds=seconds, label=f"{label}-{i}"))
    return _summary(results), (_summary(base) if base else None)
