"""What every handler shares: typed app keys, the route role policy (``allow``), JSON responses, request context."""

from __future__ import annotations

import mmap
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.errors import UnreadableInput
from cpis_bridge.core.principal import Principal, Role

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)

PRINCIPAL = web.RequestKey("principal", Principal)
TRACE_ID = web.RequestKey[str | None]("trace_id")  # a union is no class: the type goes in the subscript
REQUEST_ID = web.RequestKey("request_id", str)
FHIR_FORMAT = web.RequestKey("fhir_format", str)  # "json" or "xml", negotiated before any /fhir handler runs
ROUTE = web.RequestKey("route", str)  # the route template, for the access log
POLICY_ATTR = "__cpis_policy__"


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may call a route. ``public`` routes need no token; ``cds`` routes verify CDS Hooks client tokens."""

    roles: frozenset[Role] = frozenset()
    public: bool = False
    cds: bool = False


def allow(*roles: Role, public: bool = False, cds: bool = False) -> Callable[[H], H]:
    """Declare a route's policy. A route without one is refused to everybody (safe by default)."""

    def mark(handler: H) -> H:
        setattr(handler, POLICY_ATTR, Policy(frozenset(roles), public, cds))
        return handler

    return mark


def policy_of(handler: object) -> Policy | None:
    return getattr(handler, POLICY_ATTR, None)


def principal(request: web.Request) -> Principal:
    p: Principal = request[PRINCIPAL]
    return p


def audit_context(request: web.Request) -> AuditContext:
    urid = request.headers.get("NHSD-Session-URID")
    if urid is not None and not (len(urid) <= 64 and urid.isascii() and urid.isprintable()):
        urid = None  # recorded as sent, or not at all: never a malformed value in the audit
    return AuditContext(principal(request), request.get(TRACE_ID), request.get(REQUEST_ID), session_urid=urid or None)


def json_response(
    body: Any, *, status: int = 200, content_type: str = "application/json", headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=content_type, headers=headers)


PROBLEM_TYPE_BASE = "https://cpis-bridge.example/problems/"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    code: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if code:
        body["code"] = code
    if errors:
        body["errors"] = errors
    if extra:
        body.update(extra)
    return json_response(body, status=status, content_type="application/problem+json", headers=headers)


# -- JSON bodies: bounded nesting ----------------------------------------------------------------------------------
MAX_NESTING: Final = 32  # a record or upload envelope is 3 levels deep; nothing legitimate comes near
MAX_FHIR_NESTING: Final = 64  # FHIR resources nest extensions and codings; still far from harmful
_ESCAPE: Final = re.compile(rb"\\.", re.S)
_DROP: Final = bytes(b for b in range(256) if b not in b'"[]{}')
_GENERIC: Final = bytes.maketrans(b"{}", b"[]")
_CHUNK: Final = 1 << 16


def nesting_within(buf: bytes | mmap.mmap, limit: int, *, chunk_size: int = _CHUNK) -> bool:
    """False when any point of the JSON text ``buf`` (bytes or an mmap) lies more than ``limit`` brackets deep, or
    when its brackets do not balance (then it is not JSON either; a body with no more than ``limit`` openers is left
    to the parser, which reports that itself).

    A parser must never see such input: a streaming parser's memory grows with the square of the depth (a few KB of
    ``[`` grow ijson by gigabytes before it notices the input never closes). Linear, at C speed, in memory about the
    size of the bracket skeleton: chunk by chunk, escapes are dropped, then all but quotes and brackets, then strings
    (a string is the text between two quotes once escapes are gone, exactly as a parser splits it). The skeleton, both
    bracket kinds as one, then loses its innermost ``[]`` pairs once a pass: within ``limit`` passes a shallow,
    balanced skeleton is empty, and a pass that removes nothing means it does not balance.
    """
    if isinstance(buf, bytes) and buf.count(b"[") + buf.count(b"{") <= limit:
        return True  # the usual small body: nothing can be deeper than its number of openers
    skeleton = bytearray()
    escaped = in_string = False  # carried across chunk boundaries
    for start in range(0, len(buf), chunk_size):
        chunk = buf[start : start + chunk_size]
        if escaped:
            chunk, escaped = chunk[1:], False
        if b"\\" in chunk:
            chunk = _ESCAPE.sub(b"", chunk)
            if chunk.endswith(b"\\"):  # only a final backslash can be left: it escapes the next chunk's first byte
                chunk, escaped = chunk[:-1], True
        chunk = chunk.translate(None, _DROP)
        if in_string:
            end = chunk.find(b'"')
            if end < 0:
                continue
            chunk, in_string = chunk[end + 1 :], False
        if b'"' in chunk:
            if chunk.count(b'"') % 2:  # the last string runs on into the next chunk
                chunk, in_string = chunk[: chunk.rfind(b'"')], True
            bare = chunk.replace(b'""', b"")  # strings rarely hold brackets: then each is "" here
            chunk = bare if b'"' not in bare else b"".join(chunk.split(b'"')[::2])
        skeleton += chunk
    if in_string or escaped:
        return False  # a string that never ends
    text = bytes(skeleton.translate(_GENERIC))
    del skeleton
    for _ in range(limit):
        if not text:
            return True
        reduced = text.replace(b"[]", b"")
        if len(reduced) == len(text):
            return False
        text = reduced
    return not text


def loads_json(body: bytes, *, limit: int = MAX_NESTING) -> Any:
    """A request body parsed by orjson, or UnreadableInput (400) when it is not JSON or nests deeper than ``limit``."""
    if not nesting_within(body, limit):
        raise UnreadableInput(f"the body is not valid JSON or nests deeper than {limit} levels")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UnreadableInput("the body is not valid JSON") from None
