"""The OpenAPI 3.1 document of the /v1 API (kept in cpis_bridge/data/openapi.yaml), served at GET /v1/openapi.json."""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import orjson
import yaml
from aiohttp import web

from cpis_bridge.web.common import allow
from cpis_bridge.web.state import SETTINGS

routes = web.RouteTableDef()
DOCUMENT = "openapi.yaml"


@functools.cache
def _source() -> dict[str, Any]:
    text = resources.files("cpis_bridge").joinpath("data", DOCUMENT).read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def document(base_url: str | None = None) -> dict[str, Any]:
    """The document as published; ``servers`` names the service's own external URL when given."""
    doc = copy.deepcopy(_source())
    if base_url:
        doc["servers"] = [{"url": base_url.rstrip("/"), "description": "this service"}]
    return doc


@functools.cache
def _rendered(base_url: str) -> bytes:
    return orjson.dumps(document(base_url))


@routes.get("/v1/openapi.json")
@allow(public=True)
async def openapi_json(request: web.Request) -> web.Response:
    body = _rendered(request.app[SETTINGS].base_url)
    return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "public, max-age=300"})


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
