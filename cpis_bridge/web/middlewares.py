"""Cross-cutting request handling: ids and TraceID, metrics, the deadline, size limits, authentication and role
policy, errors.

Errors under /fhir render as OperationOutcome in the negotiated FHIR format (JSON or XML, with the national error
code); everywhere else as RFC 9457 problem+json. Every 401 carries ``WWW-Authenticate: Bearer``.
A request still running at its deadline (CPIS_REQUEST_DEADLINE_S for /fhir and /cds-services, whose callers give up
after a few seconds; CPIS_API_REQUEST_DEADLINE_S for the rest; none for uploads, which stream for minutes) is
cancelled and answered 503 with Retry-After, as is a store that cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from cpis_bridge.core.errors import CpisError, Forbidden, PayloadTooLarge, StoreUnavailable
from cpis_bridge.fhir.formats import CONTENT_TYPES, NotAcceptable, negotiate, render
from cpis_bridge.fhir.outcome import operation_outcome
from cpis_bridge.log import request_id_var, trace_id_var
from cpis_bridge.web.common import FHIR_FORMAT, PRINCIPAL, REQUEST_ID, ROUTE, TRACE_ID, Handler, policy_of, problem
from cpis_bridge.web.state import METRICS, SERVICES, SETTINGS

log = logging.getLogger("cpis_bridge.web")

MiB = 1024 * 1024
UPLOAD_LIMIT = 128 * MiB
DEFAULT_LIMIT = 1 * MiB
CLIENT_CLOSED = 499  # metric status of a request whose client disconnected before the answer (as nginx logs it)
RETRY_AFTER = {"Retry-After": "1"}
SHORT_DEADLINE_PREFIXES = ("/fhir", "/cds-services")
UPLOADS = "/v1/uploads"


def route_template(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


def body_limit(request: web.Request) -> int:
    return request.app[SETTINGS].upload_max_bytes if request.path == "/v1/uploads" else DEFAULT_LIMIT


def size_text(limit: int) -> str:
    """A byte limit for error messages: whole MiB where it is one, else KiB or bytes."""
    for unit, size in (("MiB", MiB), ("KiB", 1024)):
        if limit >= size and limit % size == 0:
            return f"{limit // size} {unit}"
    return f"{limit} bytes"


def error_response(
    request: web.Request,
    status: int,
    title: str,
    detail: str,
    *,
    code: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if status == 401:  # RFC 6750 section 3: a 401 names the scheme, and says why when a token was sent
        challenge = 'Bearer error="invalid_token"' if request.headers.get("Authorization") else "Bearer"
        headers = {**(headers or {}), "WWW-Authenticate": challenge}
    if request.path.startswith("/fhir"):
        expression = [e["field"] for e in errors or []] or None
        if code is None and request.match_info.http_exception is not None:
            code = "UNSUPPORTED_SERVICE"  # no such endpoint or method, as against no such resource
        body = operation_outcome(status, detail, spine=code, expression=expression)
        fmt = request.get(FHIR_FORMAT) or "json"
        return web.Response(body=render(body, fmt), status=status, content_type=CONTENT_TYPES[fmt], headers=headers)
    return problem(status, title, detail, code=code, errors=errors, headers=headers)


def header_text(value: str | None, limit: int) -> str | None:
    """A client header as safe text: undecodable bytes (aiohttp keeps them as lone surrogates, which Redis, JSON and
    hashing refuse) become U+FFFD, control characters are dropped, and the value is cut to ``limit`` characters."""
    if not value:
        return None
    if len(value) <= limit and value.isascii() and value.isprintable():
        return value  # the common case, unchanged by the steps below
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = "".join(c for c in text if c.isprintable())[:limit]
    return text or None


def store_unavailable(request: web.Request) -> web.Response:
    return error_response(
        request, 503, "Service unavailable", "the data store is unavailable; retry shortly", headers=RETRY_AFTER
    )


def deadline_of(request: web.Request) -> float | None:
    settings = request.app[SETTINGS]
    path = request.path
    if path.startswith(SHORT_DEADLINE_PREFIXES):
        return settings.request_deadline_s
    return None if path == UPLOADS else settings.api_request_deadline_s


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors to responses around size limits, authentication and the role policy, then the handler."""
    try:
        if request.path.startswith("/fhir"):  # decided first: every answer, errors too, comes in this format
            try:
                request[FHIR_FORMAT] = negotiate(request.query.get("_format"), request.headers.get("Accept"))
            except NotAcceptable as exc:
                return error_response(request, 406, "Not acceptable", str(exc))
        return await _checked(request, handler)
    except StoreUnavailable as exc:
        log.error("web.store_unavailable", extra={"error": type(exc).__name__, "route": route_template(request)})
        return store_unavailable(request)
    except CpisError as exc:
        if exc.status >= 500:
            log.error("web.error", extra={"error": type(exc).__name__, "route": route_template(request)})
        return error_response(
            request, exc.status, exc.title, exc.detail, code=exc.code, errors=[e.as_dict() for e in exc.errors]
        )
    except web.HTTPRequestEntityTooLarge:
        return error_response(request, 413, "Payload too large", "the request body is too large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = {404: "no such resource", 405: "method not allowed"}.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(request, exc.status, exc.reason, detail, headers=headers)
    except Exception:
        log.exception("web.unhandled", extra={"route": route_template(request)})
        return error_response(request, 500, "Internal error", "an internal error occurred")


async def _checked(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Size limits, then authentication and the route's role policy."""
    length = request.content_length
    if length is not None and length > body_limit(request):
        raise PayloadTooLarge(f"the request body is over the {size_text(body_limit(request))} limit")
    match_info = request.match_info
    if match_info.route is None or match_info.http_exception is not None:
        return await handler(request)  # unmatched: let it answer 404/405
    policy = policy_of(match_info.handler)
    if policy is None:
        raise Forbidden("this route has no access policy")
    if policy.public:
        return await handler(request)
    auth = request.app[SERVICES].auth
    if policy.cds:
        url = request.app[SETTINGS].base_url + request.path
        # a feedback call's token may name the service itself (CDS Hooks: aud is the service's endpoint)
        who = await auth.verify_cds(request.headers.get("Authorization"), [url, url.removesuffix("/feedback")])
    else:
        who = await auth.verify_bearer(request.headers.get("Authorization"))
    request[PRINCIPAL] = who
    if who.role not in policy.roles:
        raise Forbidden("this role may not call this endpoint")
    return await handler(request)


def make_middlewares() -> list[Middleware]:
    """One middleware (each aiohttp middleware layer costs a wrapper call per request): request id and TraceID,
    metrics, then errors around limits, authentication and policy."""

    @web.middleware
    async def context(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        rid = header_text(headers.get("X-Request-ID"), 64) or os.urandom(16).hex()
        trace = header_text(headers.get("TraceID"), 128)
        request[REQUEST_ID] = rid
        request[TRACE_ID] = trace
        t_rid, t_trace = request_id_var.set(rid), trace_id_var.set(trace)
        started = time.perf_counter()
        status = 500
        try:
            deadline = deadline_of(request)
            if deadline is None:
                response = await _guarded(request, handler)
            else:
                try:
                    # asyncio.timeout is one timer handle, not the task wait_for would create per request.
                    async with asyncio.timeout(deadline):
                        response = await _guarded(request, handler)
                except TimeoutError:  # only the deadline: _guarded turns every error inside into a response
                    log.warning("web.deadline", extra={"route": route_template(request), "deadlineS": deadline})
                    response = error_response(
                        request,
                        503,
                        "Service unavailable",
                        "the request did not complete in time; retry shortly",
                        headers=RETRY_AFTER,
                    )
            status = response.status
            response.headers["X-Request-ID"] = rid
            if trace:
                response.headers["TraceID"] = trace
            correlation = header_text(headers.get("X-Correlation-ID"), 128)
            if correlation:
                response.headers["X-Correlation-ID"] = correlation
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client went away mid-request: not a server error
            raise
        finally:
            route = request[ROUTE] = route_template(request)
            request.app[METRICS].observe_request(route, request.method, status, time.perf_counter() - started)
            request_id_var.reset(t_rid)
            trace_id_var.reset(t_trace)

    return [context]


__all__ = ["StoreUnavailable", "error_response", "make_middlewares", "route_template"]
