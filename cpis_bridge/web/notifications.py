"""Local-authority notification endpoints (docs/contract.md §4): pull inbox, acknowledgements, a child's accesses."""

from __future__ import annotations

from aiohttp import web

from cpis_bridge.core.errors import NotFound, UnreadableInput
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.principal import Role
from cpis_bridge.services.inbox import DEFAULT_LIMIT, MAX_LIMIT
from cpis_bridge.web.common import allow, audit_context, json_response, principal
from cpis_bridge.web.state import SERVICES

routes = web.RouteTableDef()


@routes.get("/v1/children/{nhs}/accesses")
@allow(Role.LOCAL_AUTHORITY)
async def child_accesses(request: web.Request) -> web.Response:
    if request.query:
        raise UnreadableInput("this endpoint takes no query parameters")
    try:
        nhs = NhsNumber.parse(request.match_info["nhs"])
    except InvalidNhsNumber:
        raise NotFound("no such child") from None  # section 4: anything but a held number looks absent
    items = await request.app[SERVICES].inbox.child_accesses(audit_context(request), principal(request).ods, nhs)
    return json_response({"accesses": items})


@routes.get("/v1/notifications")
@allow(Role.LOCAL_AUTHORITY)
async def list_notifications(request: web.Request) -> web.Response:
    unknown = set(request.query) - {"after", "limit"}
    if unknown:
        raise UnreadableInput("the only parameters are after and limit")
    raw_limit = request.query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
    except ValueError:
        raise UnreadableInput("limit must be an integer from 1 to 1000") from None
    if limit < 1:
        raise UnreadableInput("limit must be an integer from 1 to 1000")
    body = await request.app[SERVICES].inbox.notifications(
        audit_context(request), principal(request).ods, request.query.get("after") or None, min(limit, MAX_LIMIT)
    )
    return json_response(body)


@routes.post("/v1/notifications/{id}/ack")
@allow(Role.LOCAL_AUTHORITY)
async def ack_notification(request: web.Request) -> web.Response:
    await request.app[SERVICES].inbox.acknowledge(
        audit_context(request), principal(request).ods, request.match_info["id"]
    )
    return web.Response(status=204)
