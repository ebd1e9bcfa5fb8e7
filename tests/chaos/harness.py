"""Chaos harness: a webhook receiver that can fail on purpose, a load driver of unscheduled look-ups, and checks
that every acknowledged access is kept and notified. Loopback only; every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from standardwebhooks import Webhook

from cpis_bridge.core.nhs import iter_test_numbers
from tests.conftest import auth, record

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ED = auth("care-setting", "RXX01", name="Dr Chaos Example", role_code="R8000")
LA1 = auth("local-authority", "LA001")


def webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def write_registry(path: Path, webhook_url: str | None, secret_env: str = "LA001_WEBHOOK_SECRET") -> Path:
    notify = f'    notify:\n      webhook: {{url: "{webhook_url}", secretEnv: {secret_env}}}\n' if webhook_url else ""
    path.write_text(
        "localAuthorities:\n"
        "  - ods: LA001\n"
        "    name: Example Borough Council Children's Services\n"
        '    officeHoursPhone: "0300 000 0001"\n'
        '    emergencyDutyPhone: "0300 000 0002"\n'
        f"{notify}"
        "careSettings:\n"
        "  - {ods: RXX01, name: Example Hospital Emergency Department, type: ED, unscheduled: true}\n"
    )
    return path


@dataclass
class Receiver:
    """An LA webhook endpoint. ``mode``: ok, fail (500), slow (sleeps past the sender's timeout), down (refuses)."""

    secret: str
    mode: str = "ok"
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)
    bad_signatures: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(time.monotonic())
        body = await request.read()
        if self.mode == "fail":
            return web.Response(status=500)
        if self.mode == "slow":
            await asyncio.sleep(30)
            return web.Response(status=504)
        try:
            Webhook(self.secret).verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400)
        self.received.append(orjson.loads(body))
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await self._bind()
        return self

    async def _bind(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            server = self._site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def go_down(self) -> None:
        self.mode = "down"
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def come_back(self) -> None:
        self.mode = "ok"
        if self._site is None:
            await self._bind()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def unique_source_events(self) -> Counter[str]:
        return Counter(n["access"]["sourceEventId"] for n in self.received)

    def unique_ids(self) -> set[str]:
        return {n["id"] for n in self.received}


def children(n: int, start: int = 0) -> list[str]:
    return [str(x) for x in itertools.islice(iter_test_numbers(start), n)]


async def load_children(
    session: aiohttp.ClientSession,
    base: str,
    nhs_numbers: list[str],
    sequence: int = 1,
    la_headers: dict[str, str] = LA1,
) -> None:
    records = [record(f"K{i}", nhs) for i, nhs in enumerate(nhs_numbers)]
    body = orjson.dumps({"sequence": sequence, "mode": "delta", "recordCount": len(records), "records": records})
    async with session.post(
        f"{base}/v1/uploads", data=body, headers={**la_headers, "Content-Type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["accepted"] == len(records)


@dataclass
class LoadResult:
    acknowledged: dict[str, str] = field(default_factory=dict)  # TraceID -> NHS number
    failed: int = 0
    answers: list[tuple[int, float]] = field(default_factory=list)  # (status, seconds) of each answer; 0: no answer


async def drive_accesses(
    base_urls: list[str],
    nhs_numbers: list[str],
    total: int,
    *,
    concurrency: int = 16,
    deadline_s: float = 120.0,
    pause_s: float = 0.0,
    result: LoadResult | None = None,
) -> LoadResult:
    """``total`` unscheduled CareTeam look-ups with distinct TraceIDs spread over the children and the services.
    ``result``, when given, is filled as answers come (so a scenario can place its fault by progress)."""
    result = LoadResult() if result is None else result
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    stop_at = time.monotonic() + deadline_s
    timeout = aiohttp.ClientTimeout(total=10)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            nhs = nhs_numbers[i % len(nhs_numbers)]
            trace = f"chaos-{i}-{secrets.token_hex(4)}"
            base = base_urls[i % len(base_urls)]
            started = time.monotonic()
            try:
                async with session.get(
                    f"{base}/fhir/CareTeam",
                    params={"patient:identifier": f"{NHS_SYSTEM}|{nhs}"},
                    headers={**ED, "TraceID": trace, "IsUnscheduledAccessEvent": "true"},
                ) as r:
                    await r.read()
                    result.answers.append((r.status, time.monotonic() - started))
                    if 200 <= r.status < 300:
                        result.acknowledged[trace] = nhs
                    else:
                        result.failed += 1
            except (aiohttp.ClientError, TimeoutError):
                result.answers.append((0, time.monotonic() - started))
                result.failed += 1
            if pause_s:
                await asyncio.sleep(pause_s * random.random())

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return result


async def fault_point(result: LoadResult, total: int, timeout: float = 60.0) -> int:
    """Wait until a random 10-60 % of ``total`` accesses have been answered (the moment to inject a fault, placed by
    progress so a faster service cannot finish first); returns how many had been answered."""
    target = random.randint(total // 10, total * 6 // 10)
    done = await wait_for(lambda: len(result.acknowledged) + result.failed >= target, timeout, interval=0.005)
    assert done, f"the load did not reach {target} answers within {timeout} s"
    return len(result.acknowledged) + result.failed


async def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
