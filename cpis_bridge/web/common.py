"""What every handler shares: typed app keys, the route role policy (``allow``), JSON responses, request context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.principal import Principal, Role

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)

PRINCIPAL = web.RequestKey("principal", Principal)
TRACE_ID = web.RequestKey("trace_id", str | None)  # type: ignore[arg-type]
REQUEST_ID = web.RequestKey("request_id", str)
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
    return AuditContext(principal(request), request.get(TRACE_ID), request.get(REQUEST_ID))


def json_response(
    body: Any, *, status: int = 200, content_type: str = "application/json", headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type=content_type, headers=headers
    )


PROBLEM_TYPE_BASE = "https://cpis-bridge.example/problems/"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    code: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
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
    return json_response(body, status=status, content_type="application/problem+json", headers=headers)
