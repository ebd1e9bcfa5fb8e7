"""Real HTTP receivers for delivery tests: an LA webhook (Standard Webhooks verified with the `standardwebhooks`
library) and an LA FHIR server, both on 127.0.0.1, able to misbehave on purpose (5xx, slow, 429 + Retry-After,
410, 4xx, down = connection refused, hung = accepts and never answers until ``recover()``); and the registry
writer that points LAs at them."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks import Webhook

NEW_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
CARE_SETTINGS = (
    "  - {ods: RXX01, name: Example Hospital Emergency Department, type: ED, unscheduled: true}",
    "  - {ods: RXX02, name: Example Urgent Treatment Centre, type: UTC, unscheduled: true}",
    "  - {ods: GP001, name: Example Surgery, type: GP, unscheduled: false}",
)


def webhook_secret() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def webhook_block(url: str, secret_env: str = "LA001_WEBHOOK_SECRET") -> dict[str, Any]:
    """The registry's ``notify`` block for a webhook at ``url`` signed with the secret in ``secret_env``."""
    return {"webhook": {"url": url, "secretEnv": secret_env}}


@dataclass
class Attempt:
    at: float
    status: int | None  # None: the answer never came back in time (slow)
    id: str | None


@dataclass
class Receiver:
    """Answers per ``behaviour(attempt_number, request) -> status`` (default 200); records every attempt and the
    notifications accepted with a 2xx (``accepted`` by id, ``received`` in order, ``arrived``: epoch seconds of each
    id's first acceptance). ``slow_s`` > 0 makes the answer come late (beyond the client's timeout); ``hung`` holds
    every request unanswered until ``recover()``; ``mode`` is a switch a scenario flips mid-run: "ok", "fail" (500),
    "slow" (30 s) or "down" (see ``go_down``). ``max_in_flight`` is the most requests it ever held at once."""

    secret: str = field(default_factory=lambda: NEW_SECRET)
    behaviour: Callable[[int, web.Request], int] | None = None
    retry_after: str | None = None
    slow_s: float = 0.0
    hung: bool = False
    mode: str = "ok"
    in_flight: int = 0
    max_in_flight: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    accepted: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    received: list[dict[str, Any]] = field(default_factory=list)
    arrived: dict[str, float] = field(default_factory=dict)
    bad_signatures: int = 0
    port: int = 0
    on_accept: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None
    _recovered: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cpis"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def ids(self) -> list[str]:
        return [i for i, bodies in self.accepted.items() for _ in bodies]

    def unique_ids(self) -> set[str]:
        return set(self.accepted)

    def unique_source_events(self) -> Counter[str]:
        """How many times each access (its TraceID) was accepted."""
        return Counter(n["access"]["sourceEventId"] for n in self.received)

    def latencies(self) -> list[float]:
        """Access-to-receipt of each notification: its first arrival less the access's occurredAt (one clock)."""
        occurred = {
            n["id"]: dt.datetime.fromisoformat(n["access"]["occurredAt"].replace("Z", "+00:00")).timestamp()
            for n in self.received
        }
        return sorted(self.arrived[i] - occurred[i] for i in self.arrived)

    async def _webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            Webhook(self.secret).verify(raw, headers)
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=401)
        body = orjson.loads(raw)
        return await self._answer(request, body, body["id"])

    async def _fhir(self, request: web.Request) -> web.Response:
        resource = orjson.loads(await request.read())
        inner = orjson.loads(base64.b64decode(resource["payload"][0]["contentAttachment"]["data"]))
        resource["_notification"] = inner
        return await self._answer(request, resource, inner["id"])

    def recover(self) -> None:
        """Stop hanging: requests held so far are answered 503 (their senders have given up on them anyway)."""
        self.hung = False
        self._recovered.set()

    async def _answer(self, request: web.Request, body: dict[str, Any], nid: str) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hung:
                self.attempts.append(Attempt(time.monotonic(), None, nid))
                await self._recovered.wait()
                return web.Response(status=503)
            return await self._respond(request, body, nid)
        finally:
            self.in_flight -= 1

    async def _respond(self, request: web.Request, body: dict[str, Any], nid: str) -> web.Response:
        n = len(self.attempts) + 1
        status = self.behaviour(n, request) if self.behaviour else 200
        if self.mode == "fail":
            status = 500
        slow_s = 30.0 if self.mode == "slow" else self.slow_s
        if slow_s:
            self.attempts.append(Attempt(time.monotonic(), None, nid))
            await asyncio.sleep(slow_s)
            return web.Response(status=200)
        self.attempts.append(Attempt(time.monotonic(), status, nid))
        headers = {"Retry-After": self.retry_after} if self.retry_after and status in (429, 503) else None
        if 200 <= status < 300:
            self.accepted.setdefault(nid, []).append(body)
            self.received.append(body)
            self.arrived.setdefault(nid, time.time())
            if self.on_accept is not None:
                out = self.on_accept(body)
                if out is not None:
                    await out
            if request.method == "PUT":
                return web.json_response(body, status=status)
        return web.Response(status=status, headers=headers)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/cpis", self._webhook)
        app.router.add_put("/fhir/Communication/{id}", self._fhir)
        # A request the sender gave up on (timeout) is cancelled here too, so in_flight counts what is really open.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2, handler_cancellation=True)
        await self._runner.setup()
        await self._bind()
        return self

    async def _bind(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def go_down(self) -> None:
        """Stop listening: connections are refused until ``come_back()`` (same port)."""
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
            self._runner = None


def write_registry(path: Path, las: dict[str, dict[str, Any]]) -> Path:
    """A registry with the test care settings and LA001/LA002 (plus any other ODS code in ``las``), each given the
    ``notify`` block in ``las`` if it has one (see ``webhook_block``)."""
    lines = ["localAuthorities:"]
    for i, ods in enumerate(dict.fromkeys(["LA001", "LA002", *las])):
        lines += [
            f"  - ods: {ods}",
            f"    name: Test Council {i + 1}",
            '    officeHoursPhone: "0300 000 0001"',
            '    emergencyDutyPhone: "0300 000 0002"',
        ]
        if las.get(ods):
            lines.append(f"    notify: {orjson.dumps(las[ods]).decode()}")
    lines += ["careSettings:", *CARE_SETTINGS]
    path.write_text("\n".join(lines) + "\n")
    return path
