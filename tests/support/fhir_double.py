"""A real aiohttp FHIR R4 server double for the Flag sync tests: Flag read/update(-create)/conditional update,
batch Bundles, search by identifier with paging, an OAuth2 token endpoint, and the ways real servers misbehave:
faults injected on purpose, an empty 200 for `Prefer: return=minimal` Bundles, 409 when too many conditional writes
overlap, bare 412s, a rate limit told only by `RateLimit` headers, a write pace, and outages (connections refused)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web


@dataclass
class Fault:
    """One planned misbehaviour, used for the next matching request (``path`` prefix; "" matches all)."""

    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    delay_s: float = 0.0  # sleep first (a timeout when longer than the client's)
    path: str = ""


class Flags(dict[str, dict[str, Any]]):
    """The server's Flags by id, indexed by identifier value (as a database would): lookups do not slow down as the
    server fills up, so the write pace is the server's only limit. Tests may add, replace and delete Flags freely."""

    def __init__(self) -> None:
        super().__init__()
        self.by_value: dict[str, set[str]] = {}

    @staticmethod
    def _values(flag: dict[str, Any]) -> list[str]:
        return [str(i.get("value")) for i in flag.get("identifier", []) if i.get("value") is not None]

    def __setitem__(self, fid: str, flag: dict[str, Any]) -> None:
        if fid in self:
            self._unindex(fid)
        super().__setitem__(fid, flag)
        for value in self._values(flag):
            self.by_value.setdefault(value, set()).add(fid)

    def __delitem__(self, fid: str) -> None:
        self._unindex(fid)
        super().__delitem__(fid)

    def _unindex(self, fid: str) -> None:
        for value in self._values(self[fid]):
            self.by_value.get(value, set()).discard(fid)

    def with_value(self, value: str) -> list[dict[str, Any]]:
        return [self[fid] for fid in sorted(self.by_value.get(value, ())) if fid in self]


def outcome(code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class FhirDouble:
    def __init__(
        self,
        *,
        update_create: bool = True,
        conditional_update: bool = True,
        batch: bool = True,
        always_200: bool = False,
        fhir_version: str = "4.0.1",
        token: str | None = None,
    ) -> None:
        self.flags = Flags()
        self.faults: deque[Fault] = deque()
        self.update_create = update_create
        self.conditional_update = conditional_update
        self.batch = batch
        self.always_200 = always_200
        self.fhir_version = fhir_version
        self.racy = False  # conditional update not race-safe (two concurrent creates make two Flags)
        self.token = token  # required bearer token, when set
        self.tokens_issued = 0
        self.communications: dict[str, dict[str, Any]] = {}
        self.token_ttl = 3600
        self.requests: list[tuple[float, str, str, int]] = []  # (arrival monotonic, method, path, status)
        self.answered: list[float] = []  # when each of those was answered
        self.reject: dict[str, tuple[int, dict[str, Any]]] = {}  # identifier value -> (status, body) always
        self.declared_update_create: bool | None = None  # what the CapabilityStatement says, when not the truth
        self.blank_batch_answers = 0  # the next this many Bundles are applied but answered 200 with no body
        self.honour_minimal = True  # a Bundle with Prefer return=minimal gets 200 and no body (as HAPI answers)
        self.bare_412 = False  # 412s come with no body at all
        self.conflict_above: int | None = None  # more conditional writes than this in flight: 409 to the extras
        self.conditional_in_flight = 0
        self.pace: float | None = None  # writes per second the "database" takes, one at a time (None: instant)
        self.busy_s = 0.0  # time the database spent writing
        self.db_free = 0.0  # when the database can start its next write
        self.db = asyncio.Lock()
        self.rate_limit: tuple[int, float] | None = None  # (requests, window seconds), fixed windows
        self.rate_style = "structured"  # or "draft" (limit=, remaining=, reset=), "split" (RateLimit-*), "x"
        self.window: tuple[float, int] = (0.0, 0)  # (window start, requests counted)
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/fhir{tail:.*}", self.handle)
        self.app.router.add_post("/token", self.token_endpoint)
        self.runner: web.AppRunner | None = None
        self.base_url = ""
        self.lock = asyncio.Lock()

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.root = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root}/fhir"
        return self.base_url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def go_down(self) -> None:
        """An outage: stop listening and drop every open connection (clients get connection refused/reset)."""
        assert self.runner is not None
        self.port = int(self.root.rsplit(":", 1)[1])
        for site in list(self.runner.sites):
            await site.stop()
        server = self.runner.server
        for proto in list(getattr(server, "connections", [])):
            proto.force_close()

    async def come_back(self) -> None:
        assert self.runner is not None
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    def add_duplicate(self, value: str, *, id_: str | None = None) -> str:
        """A second Flag with the identifier ``value`` (a copy of the first, newer), as another writer may leave."""
        first = self.by_identifier(value)[0]
        fid = id_ or str(uuid.uuid4())
        self.flags[fid] = dict(first, id=fid, meta={"versionId": "1", "lastUpdated": self._now()})
        return fid

    async def own_time(self, n: int, system: str) -> float:
        """The server's own time for ``n`` conditional Flag writes made directly (no client, no HTTP), two at a
        time, on the same machine under the same load as the test; the Flags are removed again."""

        async def one(i: int) -> None:
            flag = {"resourceType": "Flag", "status": "active", "identifier": [{"system": system, "value": f"OWN|{i}"}]}
            await self._put("Flag", f"identifier={system}|OWN|{i}", flag)

        t0 = time.monotonic()
        for i in range(0, n, 2):
            await asyncio.gather(*(one(j) for j in range(i, min(n, i + 2))))
        seconds = time.monotonic() - t0
        for fid in [f["id"] for f in self.flags.values() if f["identifier"][0]["value"].startswith("OWN|")]:
            del self.flags[fid]
        return seconds

    @staticmethod
    def _now() -> str:
        return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

    # -- helpers ----------------------------------------------------------------------------------------------
    def by_identifier(self, value: str) -> list[dict[str, Any]]:
        return self.flags.with_value(value)

    def state(self) -> dict[str, tuple[Any, ...]]:
        """identifier value -> (status, start, end, nhs): what the tests compare with the store."""
        out = {}
        for f in self.flags.values():
            key = f["identifier"][0]["value"]
            p = f.get("period", {})
            out[key] = (f["status"], p.get("start"), p.get("end"), f["subject"]["identifier"]["value"])
        return out

    @staticmethod
    def _json(status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=status,
            body=b"" if body is None else orjson.dumps(body),
            content_type="application/fhir+json",
            headers=headers,
        )

    async def token_endpoint(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        self.last_token_form = dict(form)
        self.last_token_auth = request.headers.get("Authorization")
        self.tokens_issued += 1
        self.token = f"tok-{self.tokens_issued}"
        return web.json_response({"access_token": self.token, "token_type": "bearer", "expires_in": self.token_ttl})

    # -- FHIR -------------------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"].strip("/")
        status_holder: list[int] = []
        arrived = time.monotonic()
        try:
            resp = await self._handle(request, tail)
            status_holder.append(resp.status)
            return resp
        finally:
            path = f"{tail}?{request.query_string}" if request.query_string else tail
            self.requests.append((arrived, request.method, path, status_holder[0] if status_holder else 0))
            self.answered.append(time.monotonic())

    async def _handle(self, request: web.Request, tail: str) -> web.Response:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(401, outcome("login", "bad token"))
        for fault in list(self.faults):
            if tail.startswith(fault.path) and tail != "metadata":
                self.faults.remove(fault)
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                return self._json(fault.status, fault.body, fault.headers)
        if tail == "metadata":
            return self._json(200, self.capability())
        limit_headers = self._count_request()
        if limit_headers is not None and limit_headers[0]:
            return self._json(429, outcome("throttled", "rate limit"), limit_headers[1])
        resp = await self._route(request, tail)
        if limit_headers is not None:
            resp.headers.update(limit_headers[1])
        return resp

    def _count_request(self) -> tuple[bool, dict[str, str]] | None:
        """The rate limit: (refused?, the RateLimit headers to send), never a Retry-After."""
        if self.rate_limit is None:
            return None
        quota, window = self.rate_limit
        now = time.monotonic()
        start, used = self.window
        if now - start >= window:
            start, used = now, 0
        refused = used >= quota
        used += 0 if refused else 1
        self.window = (start, used)
        left, reset = quota - used, max(0, math.ceil(start + window - now))
        headers = {
            "structured": {
                "RateLimit-Policy": f'"default";q={quota};w={int(window)}',
                "RateLimit": f'"default";r={left};t={reset}',
            },
            "draft": {"RateLimit": f"limit={quota}, remaining={left}, reset={reset}"},
            "split": {"RateLimit-Limit": str(quota), "RateLimit-Remaining": str(left), "RateLimit-Reset": str(reset)},
            "x": {
                "X-RateLimit-Limit": str(quota),
                "X-RateLimit-Remaining": str(left),
                "X-RateLimit-Reset": str(int(time.time()) + reset),
            },
        }[self.rate_style]
        return refused, headers

    async def _route(self, request: web.Request, tail: str) -> web.Response:
        minimal = "return=minimal" in request.headers.get("Prefer", "")
        if tail == "" and request.method == "POST":
            resp = await self._bundle(await request.read())
            if resp.status == 200 and ((minimal and self.honour_minimal) or self.blank_batch_answers > 0):
                self.blank_batch_answers = max(0, self.blank_batch_answers - 1)
                return self._json(200, None)  # applied, but nothing says how each entry went
            return resp
        if tail == "Flag" and request.method == "GET":
            return self._search(request)
        if request.method == "PUT" and tail.startswith("Flag"):
            status, body = await self._put(tail, request.query_string, orjson.loads(await request.read()))
            if status == 412 and self.bare_412:
                body = None
            return self._json(status, body)
        if request.method == "PUT" and tail.startswith("Communication/"):
            self.communications[tail.partition("/")[2]] = orjson.loads(await request.read())
            return self._json(201, None)
        if request.method == "GET" and tail.startswith("Flag/"):
            flag = self.flags.get(tail[5:])
            return self._json(200, flag) if flag else self._json(404, outcome("not-found", "no such Flag"))
        return self._json(404, outcome("not-supported", "unknown route"))

    def capability(self) -> dict[str, Any]:
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "kind": "instance",
            "fhirVersion": self.fhir_version,
            "format": ["json"],
            "rest": [
                {
                    "mode": "server",
                    "interaction": [{"code": "batch"}] if self.batch else [],
                    "resource": [
                        {
                            "type": "Flag",
                            "interaction": [{"code": "read"}, {"code": "update"}, {"code": "search-type"}],
                            "updateCreate": self.update_create
                            if self.declared_update_create is None
                            else self.declared_update_create,
                            "conditionalUpdate": self.conditional_update,
                        }
                    ],
                }
            ],
        }

    async def _put(self, tail: str, query: str, flag: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        value = flag.get("identifier", [{}])[0].get("value", "")
        if value in self.reject:
            return self.reject[value]
        if flag.get("resourceType") != "Flag" or flag.get("status") not in ("active", "inactive", "entered-in-error"):
            return 422, outcome("invalid", "Flag.status is invalid")
        conditional = not tail.startswith("Flag/")
        if conditional and self.conflict_above is not None:
            if self.conditional_in_flight >= self.conflict_above:  # a serialisation failure in the database
                return 409, outcome("conflict", "could not serialize access due to concurrent update")
            self.conditional_in_flight += 1
            try:
                return await self._put_now(tail, query, flag, conditional)
            finally:
                self.conditional_in_flight -= 1
        return await self._put_now(tail, query, flag, conditional)

    async def _paced(self) -> None:
        """One write of the database, one at a time, each 1/pace s; a late wake-up is caught up by the next write,
        so n back-to-back writes take n/pace s (the server's own time for them)."""
        if self.pace is not None:
            async with self.db:
                now = time.monotonic()
                self.db_free = max(self.db_free, now) + 1 / self.pace
                self.busy_s += 1 / self.pace
                if self.db_free > now:
                    await asyncio.sleep(self.db_free - now)

    async def _put_now(
        self, tail: str, query: str, flag: dict[str, Any], conditional: bool
    ) -> tuple[int, dict[str, Any] | None]:
        await self._paced()
        racy_matches = None
        if self.racy and conditional:  # like common servers: search, then write, not atomic
            wanted = unquote(query.partition("identifier=")[2]).partition("|")[2]
            racy_matches = self.by_identifier(wanted)
            await asyncio.sleep(0.15)
        async with self.lock:
            if tail.startswith("Flag/"):
                fid = tail[5:]
                if flag.get("id") != fid:
                    return 400, outcome("invalid", "id does not match the URL")
                if fid not in self.flags and not self.update_create:
                    return 405, outcome("not-supported", "update-as-create is not supported")
            else:
                if not self.conditional_update:
                    return 405, outcome("not-supported", "conditional update is not supported")
                wanted = unquote(query.partition("identifier=")[2]).partition("|")[2]
                matches = self.by_identifier(wanted) if racy_matches is None else racy_matches
                if len(matches) > 1:
                    return 412, outcome("multiple-matches", f"criteria matched {len(matches)} resources")
                fid = matches[0]["id"] if matches else str(uuid.uuid4())
                flag = dict(flag, id=fid)
            created = fid not in self.flags
            version = 1 if created else int(self.flags[fid]["meta"]["versionId"]) + 1
            flag = dict(flag, meta=dict(flag.get("meta", {}), versionId=str(version), lastUpdated=self._now()))
            self.flags[fid] = flag
        return (201 if created and not self.always_200 else 200), None

    async def _bundle(self, raw: bytes) -> web.Response:
        bundle = orjson.loads(raw)
        if not self.batch or bundle.get("type") != "batch":
            return self._json(400, outcome("not-supported", "only batch bundles"))
        entries = []
        for entry in bundle.get("entry", []):
            url = entry["request"]["url"]
            tail, _, query = url.partition("?")
            status, body = await self._put(tail, query, entry["resource"])
            reason = "Created" if status == 201 else "OK" if status < 300 else "Error"
            response: dict[str, Any] = {"status": f"{status} {reason}"}
            if body is not None:
                response["outcome"] = body
            entries.append({"response": response})
        return self._json(200, {"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    def _search(self, request: web.Request) -> web.Response:
        ident = request.query.get("identifier", "")
        system, _, value = ident.partition("|")
        count = int(request.query.get("_count", "50"))
        offset = int(request.query.get("_offset", "0"))
        pool = self.flags.with_value(value) if value else sorted(self.flags.values(), key=lambda f: f["id"])
        hits = [
            f
            for f in pool
            if any(
                i.get("system") == system and (not value or i.get("value") == value) for i in f.get("identifier", [])
            )
        ]
        page = hits[offset : offset + count]
        links = [{"relation": "self", "url": str(request.url)}]
        if offset + count < len(hits):
            links.append({"relation": "next", "url": str(request.url.update_query(_offset=str(offset + count)))})
        return self._json(
            200,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(hits),
                "link": links,
                "entry": [{"resource": f, "search": {"mode": "match"}} for f in page],
            },
        )
