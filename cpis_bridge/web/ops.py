"""Operations endpoints (docs/contract.md §8): health, readiness, metrics, the audit trail."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from cpis_bridge.core.clock import utc_now
from cpis_bridge.core.codes import RecordCode
from cpis_bridge.core.errors import UnreadableInput, ValidationFailed
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.principal import Role
from cpis_bridge.web.common import allow, audit_context, json_response
from cpis_bridge.web.state import LIFECYCLE, METRICS, SERVICES

routes = web.RouteTableDef()
READY_PROBE_S = 1.0


@routes.get("/healthz")
@allow(public=True)
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
@allow(public=True)
async def readyz(request: web.Request) -> web.Response:
    life = request.app[LIFECYCLE]
    metrics = request.app[METRICS]
    redis_ok = False
    if life.started and not life.draining:
        redis_ok = await request.app[SERVICES].store.ping(READY_PROBE_S)
    metrics.redis_up.set(1 if redis_ok else 0)
    ready = life.started and not life.draining and redis_ok
    metrics.ready.set(1 if ready else 0)
    body = {
        "status": "ready" if ready else "unavailable",
        "started": life.started,
        "draining": life.draining,
        "redis": redis_ok,
    }
    return json_response(body, status=200 if ready else 503)


@routes.get("/metrics")
@allow(public=True)
async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/admin/audit")
@allow(Role.OPS)
async def audit(request: web.Request) -> web.Response:
    unknown = set(request.query) - {"nhsNumber", "limit"}
    if unknown or "nhsNumber" not in request.query:
        raise UnreadableInput("nhsNumber is required; limit is optional")
    try:
        nhs = NhsNumber.parse(request.query["nhsNumber"])
    except InvalidNhsNumber as exc:
        raise ValidationFailed(str(exc), code=RecordCode.NHS_NUMBER_FORMAT) from None
    try:
        limit = min(max(int(request.query.get("limit", "1000")), 1), 10000)
    except ValueError:
        raise UnreadableInput("limit must be an integer") from None
    log = request.app[SERVICES].audit
    entries = await log.query(nhs, limit)
    ctx = audit_context(request)
    await log.append(None, ctx.entry("audit.read", None, utc_now(), subjectTag=log.tag(nhs)))
    return json_response({"entries": entries})
