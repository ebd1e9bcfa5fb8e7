"""A real aiohttp FHIR R4 server double for the Flag sync tests: Flag read/update(-create)/conditional update,
batch Bundles, search by identifier with paging, an OAuth2 token endpoint, and faults injected on purpose."""

from __future__ import annotations

import asyncio
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


def outcome(code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class FhirDouble:
    def __init__(self, *, update_create: bool = True, conditional_update: bool = True, batch: bool = True,
                 always_200: bool = False, fhir_version: str = "4.0.1", token: str | None = None) -> None:
        self.flags: dict[str, dict[str, Any]] = {}
        self.faults: deque[Fault] = deque()
        self.update_create = update_create
        self.conditional_update = conditional_update
        self.batch = batch
        self.always_200 = always_200
        self.fhir_version = fhir_version
        self.token = token  # required bearer token, when set
        self.tokens_issued = 0
        self.token_ttl = 3600
        self.requests: list[tuple[float, str, str, int]] = []  # (arrival monotonic, method, path, status)
        self.answered: list[float] = []  # when each of those was answered
        self.reject: dict[str, tuple[int, dict[str, Any]]] = {}  # identifier value -> (status, body) always
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

    # -- helpers ----------------------------------------------------------------------------------------------
    def by_identifier(self, value: str) -> list[dict[str, Any]]:
        return [f for f in self.flags.values() if any(i.get("value") == value for i in f.get("identifier", []))]

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
        return web.Response(status=status, body=b"" if body is None else orjson.dumps(body),
                            content_type="application/fhir+json", headers=headers)

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
        if tail == "" and request.method == "POST":
            return await self._bundle(await request.read())
        if tail == "Flag" and request.method == "GET":
            return self._search(request)
        if request.method == "PUT" and tail.startswith("Flag"):
            status, body = await self._put(tail, request.query_string, orjson.loads(await request.read()))
            return self._json(status, body)
        if request.method == "GET" and tail.startswith("Flag/"):
            flag = self.flags.get(tail[5:])
            return self._json(200, flag) if flag else self._json(404, outcome("not-found", "no such Flag"))
        return self._json(404, outcome("not-supported", "unknown route"))

    def capability(self) -> dict[str, Any]:
        return {
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
            "fhirVersion": self.fhir_version, "format": ["json"],
            "rest": [{
                "mode": "server",
                "interaction": [{"code": "batch"}] if self.batch else [],
                "resource": [{"type": "Flag", "interaction": [{"code": "read"}, {"code": "update"},
                                                              {"code": "search-type"}],
                              "updateCreate": self.update_create, "conditionalUpdate": self.conditional_update}],
            }],
        }

    async def _put(self, tail: str, query: str, flag: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        value = flag.get("identifier", [{}])[0].get("value", "")
        if value in self.reject:
            return self.reject[value]
        if flag.get("resourceType") != "Flag" or flag.get("status") not in ("active", "inactive", "entered-in-error"):
            return 422, outcome("invalid", "Flag.status is invalid")
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
                matches = self.by_identifier(wanted)
                if len(matches) > 1:
                    return 412, outcome("multiple-matches", f"criteria matched {len(matches)} resources")
                fid = matches[0]["id"] if matches else str(uuid.uuid4())
                flag = dict(flag, id=fid)
            created = fid not in self.flags
            version = 1 if created else int(self.flags[fid]["meta"]["versionId"]) + 1
            flag = dict(flag, meta=dict(flag.get("meta", {}), versionId=str(version)))
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
        system = ident.partition("|")[0]
        count = int(request.query.get("_count", "50"))
        offset = int(request.query.get("_offset", "0"))
        hits = [f for f in sorted(self.flags.values(), key=lambda f: f["id"])
                if any(i.get("system") == system for i in f.get("identifier", []))]
        page = hits[offset : offset + count]
        links = [{"relation": "self", "url": str(request.url)}]
        if offset + count < len(hits):
            links.append({"relation": "next", "url": str(request.url.update_query(_offset=str(offset + count)))})
        return self._json(200, {"resourceType": "Bundle", "type": "searchset", "total": len(hits), "link": links,
                                "entry": [{"resource": f, "search": {"mode": "match"}} for f in page]})
