"""Notification delivery benchmark: access-to-receipt p50/p99 at a steady 200 accesses/s to a local webhook
receiver; notifications/s delivered by one relay process when backlogged; and ("isolated") the same steady
access-to-receipt for one LA while another LA's webhook hangs (accepts, never answers) with thousands of
notifications queued for it. Prints one JSON line.

Relays run in a real `cpis-bridge serve` subprocess; accesses are recorded in this process through the access
use-case against the same Redis (the embedded server with the shipped persistence, or CPIS_REDIS_URL).
Usage: python -m bench.notify_latency [--rate 200] [--seconds 10] [--backlog 10000] [--children 1000]
       [--hung-backlog 3000] [--only steady,backlog,isolated] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from cpis_bridge.app import create_app
from cpis_bridge.config import Settings
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import NhsNumber, iter_test_numbers
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.store.embedded import EmbeddedRedis
from cpis_bridge.web.state import REGISTRY, SERVICES
from tests.support.polling import eventually, free_port

HASH_KEY = "bench-log-hash-key-0123456789"
DEV_SECRET = "bench-dev-secret-0123456789-0123456789"
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
REGISTRY_YAML = """localAuthorities:
  - ods: LA001
    name: Bench Council
    officeHoursPhone: "0300 000 0001"
    emergencyDutyPhone: "0300 000 0002"
    notify: {{webhook: {{url: "{url}", secretEnv: BENCH_WEBHOOK_SECRET}}}}
  - ods: LA002
    name: Bench Council With A Hung Webhook
    officeHoursPhone: "0300 000 0001"
    emergencyDutyPhone: "0300 000 0002"
    notify: {{webhook: {{url: "{hung_url}", secretEnv: BENCH_WEBHOOK_SECRET}}}}
careSettings:
  - {{ods: RXX01, name: Bench Emergency Department, type: ED, unscheduled: true}}
"""


class Receiver:
    """The LA webhook: notes when each notification arrived and how old its access was. Deliberately lighter than
    tests/support/receivers.py (no signature check), so the figures measure the relay rather than the receiver."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.arrivals: list[float] = []
        self.ids: set[str] = set()
        self.hung_attempts = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        now = time.time()
        if body["id"] not in self.ids:
            self.ids.add(body["id"])
            occurred = dt.datetime.fromisoformat(body["access"]["occurredAt"].replace("Z", "+00:00"))
            self.latencies.append(now - occurred.timestamp())
            self.arrivals.append(now)
        return web.Response(status=204)

    async def hang(self, request: web.Request) -> web.Response:
        """The other LA's webhook: accepts the request and never answers (the relay's timeout ends each attempt)."""
        self.hung_attempts += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class Bench:
    def __init__(self, redis_url: str, registry: Path, tmp: Path) -> None:
        self.redis_url = redis_url
        self.registry = registry
        self.tmp = tmp

    def settings(self, prefix: str) -> Settings:
        return Settings(
            _env_file=None,
            redis_url=self.redis_url,
            key_prefix=prefix,
            registry=self.registry,  # type: ignore[call-arg]
            data_dir=self.tmp / "local",
            auth_dev_secret=DEV_SECRET,
            log_hash_key=HASH_KEY,
            relays=False,
        )

    def service(self, prefix: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "CPIS_REDIS_URL": self.redis_url,
            "CPIS_KEY_PREFIX": prefix,
            "CPIS_REGISTRY": str(self.registry),
            "CPIS_AUTH_DEV_SECRET": DEV_SECRET,
            "CPIS_LOG_HASH_KEY": HASH_KEY,
            "CPIS_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "CPIS_PORT": str(free_port()),
            "CPIS_DATA_DIR": str(self.tmp / prefix),
            "BENCH_WEBHOOK_SECRET": SECRET,
        }
        out = os.environ.get("BENCH_PROFILE")
        profile = ["-m", "cProfile", "-o", out + prefix] if out else []
        log = Path(os.environ.get("BENCH_LOG_DIR", str(self.tmp)), f"{prefix}.log")
        return subprocess.Popen(
            [sys.executable, *profile, "-m", "cpis_bridge", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )

    async def local_app(self, prefix: str) -> tuple[web.AppRunner, web.Application]:
        app = create_app(self.settings(prefix))
        runner = web.AppRunner(app)
        await runner.setup()
        return runner, app

    @staticmethod
    async def flag_children(app: web.Application, count: int, ods: str = "LA001", start: int = 0) -> list[str]:
        numbers = [str(n) for n, _ in zip(iter_test_numbers(start), range(count), strict=False)]
        la = AuditContext(Principal("bench-la", Role.LOCAL_AUTHORITY, ods))
        for first in range(0, count, 100):
            await asyncio.gather(
                *(
                    app[SERVICES].records.put(
                        la,
                        ods,
                        f"B-{i}",
                        {
                            "localId": f"B-{i}",
                            "planType": "CPP",
                            "nhsNumber": numbers[i],
                            "dateOfBirth": "2016-04-02",
                            "startDate": "2026-01-10",
                            "endDate": None,
                        },
                    )
                    for i in range(first, min(first + 100, count))
                )
            )
        return numbers

    @staticmethod
    async def access(app: web.Application, nhs: str, event: str) -> None:
        ctx = AuditContext(Principal("bench-ed", Role.CARE_SETTING, "RXX01", name="Bench Clinician", role_code="R1"))
        setting = app[REGISTRY].care_settings["RXX01"]
        out = await app[SERVICES].access.lookup(
            ctx, LookupRequest(nhs=NhsNumber(nhs), care_setting=setting, kind="careteam", source_event_id=event)
        )
        assert out.status == 1


async def measure(
    bench: Bench, app: web.Application, receiver: Receiver, numbers: list[str], rate: float, seconds: float, prefix: str
) -> dict[str, Any]:
    """Warm up (the relay is up once a first notification arrives), then accesses at a steady ``rate`` for
    ``seconds``; the access-to-receipt percentiles of their notifications."""
    before = len(receiver.ids)
    await bench.access(app, numbers[0], f"{prefix}-warm-up")
    if not await eventually(lambda: len(receiver.ids) > before, 30, step=0.01):
        raise SystemExit("the relay process did not deliver (see its log)")
    receiver.latencies.clear()
    total = int(rate * seconds)
    started = time.monotonic()
    tasks = []
    for i in range(total):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(bench.access(app, numbers[i % len(numbers)], f"{prefix}-{i}")))
    await asyncio.gather(*tasks)
    achieved = total / (time.monotonic() - started)
    await eventually(lambda: len(receiver.latencies) >= total, 60, step=0.01)
    lat = sorted(receiver.latencies)
    return {
        "accesses": total,
        "rate_per_s": round(achieved, 1),
        "received": len(lat),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(lat[min(int(len(lat) * 0.99), len(lat) - 1)] * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1),
    }


async def steady(bench: Bench, receiver: Receiver, rate: float, seconds: float, children: int) -> dict[str, Any]:
    runner, app = await bench.local_app("bn1")
    numbers = await bench.flag_children(app, children)
    proc = bench.service("bn1")
    try:
        await asyncio.sleep(0.5)
        return await measure(bench, app, receiver, numbers, rate, seconds, "s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        await runner.cleanup()


async def isolated(
    bench: Bench, receiver: Receiver, rate: float, seconds: float, children: int, hung_backlog: int
) -> dict[str, Any]:
    """``steady`` for LA001 while LA002's webhook hangs with ``hung_backlog`` notifications queued for it (queued
    before the relay starts, so it meets them first)."""
    runner, app = await bench.local_app("bn3")
    numbers = await bench.flag_children(app, children)
    hung = await bench.flag_children(app, min(children, 200), "LA002", start=50_000)
    for first in range(0, hung_backlog, 200):
        await asyncio.gather(
            *(bench.access(app, hung[i % len(hung)], f"h-{i}") for i in range(first, min(first + 200, hung_backlog)))
        )
    attempts = receiver.hung_attempts
    proc = bench.service("bn3")
    try:
        await asyncio.sleep(0.5)
        result = await measure(bench, app, receiver, numbers, rate, seconds, "i")
        return {**result, "hung_backlog": hung_backlog, "hung_attempts": receiver.hung_attempts - attempts}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        await runner.cleanup()


async def backlog(bench: Bench, receiver: Receiver, count: int, children: int) -> dict[str, Any]:
    runner, app = await bench.local_app("bn2")
    numbers = await bench.flag_children(app, children)
    for first in range(0, count, 200):
        await asyncio.gather(
            *(bench.access(app, numbers[i % children], f"b-{i}") for i in range(first, min(first + 200, count)))
        )
    receiver.arrivals.clear()
    before = len(receiver.ids)
    proc = bench.service("bn2")
    try:
        ok = await eventually(lambda: len(receiver.ids) - before >= count, 180, step=0.01)
        arrivals = receiver.arrivals
        span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else float("nan")
        return {
            "backlog": count,
            "delivered": len(arrivals),
            "complete": ok,
            "seconds": round(span, 2),
            "per_s": round((len(arrivals) - 1) / span, 1),
            "relay_processes": 1,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        await runner.cleanup()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=10000)
    parser.add_argument("--children", type=int, default=1000)
    parser.add_argument("--hung-backlog", type=int, default=3000)
    parser.add_argument("--only", default="steady,backlog,isolated", help="comma list of: steady, backlog, isolated")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 s, small backlogs (not a measurement)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.backlog, args.children, args.hung_backlog = 1.0, 500, 100, 300
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    app.router.add_post("/hang", receiver.hang)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    result: dict[str, Any] = {"name": "notify_latency"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        registry = tmp / "registry.yaml"
        registry.write_text(
            REGISTRY_YAML.format(url=f"http://127.0.0.1:{port}/hook", hung_url=f"http://127.0.0.1:{port}/hang")
        )
        embedded = None
        redis_url = os.environ.get("CPIS_REDIS_URL")
        if not redis_url:
            embedded = EmbeddedRedis(tmp / "redis")
            embedded.start()
            redis_url = embedded.url
        try:
            bench = Bench(redis_url, registry, tmp)
            if "steady" in only:
                result["steady"] = await steady(bench, receiver, args.rate, args.seconds, args.children)
            if "backlog" in only:
                result["backlogged"] = await backlog(bench, receiver, args.backlog, args.children)
            if "isolated" in only:
                result["isolated"] = await isolated(
                    bench, receiver, args.rate, args.seconds, args.children, args.hung_backlog
                )
        finally:
            if embedded is not None:
                embedded.stop()
    await runner.cleanup()
    result["targets"] = {"p99_ms": 250, "per_s": 1000, "isolated_p99_ms": 250}
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    asyncio.run(main())
