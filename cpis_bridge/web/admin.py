"""Operations endpoints for deliveries (docs/contract.md §8): per-channel queue state and dead-letter re-queueing."""

from __future__ import annotations

from aiohttp import web

from cpis_bridge.core.errors import UnreadableInput
from cpis_bridge.core.principal import Role
from cpis_bridge.web.common import allow, audit_context, json_response
from cpis_bridge.web.state import SERVICES

routes = web.RouteTableDef()


@routes.get("/v1/admin/deliveries")
@allow(Role.OPS)
async def deliveries(request: web.Request) -> web.Response:
    if request.query:
        raise UnreadableInput("this endpoint takes no query parameters")
    return json_response(await request.app[SERVICES].deliveries.deliveries(audit_context(request)))


@routes.post("/v1/admin/dead-letters/{id}/retry")
@allow(Role.OPS)
async def retry_dead_letter(request: web.Request) -> web.Response:
    await request.app[SERVICES].deliveries.retry_dead_letter(audit_context(request), request.match_info["id"])
    return web.Response(status=204)
