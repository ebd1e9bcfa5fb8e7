"""`cpis-bridge demo` against a running app: record, unscheduled CareTeam look-up, inbox, webhook delivery.

The FHIR CareTeam endpoint is built on another branch; until it is merged this test serves a minimal stand-in that
follows API.md section 3 (the same access use-case), and uses the real one once it exists."""

from __future__ import annotations

import argparse
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from cpis_bridge.app import create_app
from cpis_bridge.cli import cmd_demo
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Role
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.web.common import allow, audit_context, json_response, principal
from cpis_bridge.web.state import ACCESS, REGISTRY
from tests.receivers import Receiver, write_registry


@allow(Role.CARE_SETTING)
async def careteam_standin(request: web.Request) -> web.Response:
    nhs = NhsNumber.parse(request.query["patient:identifier"].split("|", 1)[1])
    setting = request.app[REGISTRY].care_settings[principal(request).ods]
    out = await request.app[ACCESS].lookup(audit_context(request), LookupRequest(
        nhs=nhs, care_setting=setting, kind="careteam",
        unscheduled_claimed=request.headers.get("IsUnscheduledAccessEvent", "true").lower() != "false",
        source_event_id=request.headers.get("TraceID")))
    return json_response({"resourceType": "Bundle", "type": "searchset", "total": len(out.records)},
                         content_type="application/fhir+json")


def has_route(app: web.Application, path: str) -> bool:
    return any(r.resource is not None and r.resource.canonical == path for r in app.router.routes())


async def test_demo_shows_the_notification_and_its_webhook_delivery(make_settings, tmp_path, monkeypatch,
                                                                      capsys: Any) -> None:
    receiver = await Receiver().start()
    monkeypatch.setenv("LA001_WEBHOOK_SECRET", receiver.secret)
    registry = write_registry(tmp_path / "registry.yaml",
                              {"LA001": {"webhook": {"url": receiver.url, "secretEnv": "LA001_WEBHOOK_SECRET"}}})
    settings = make_settings(registry=registry)
    app = create_app(settings)
    if not has_route(app, "/fhir/CareTeam"):
        app.router.add_get("/fhir/CareTeam", careteam_standin)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        args = argparse.Namespace(la=None, care_setting=None, nhs_number="9990000018",
                                  url=str(server.make_url("")), wait=10.0)
        assert await cmd_demo(settings, args) == 0
        out = capsys.readouterr().out
        assert "1 CareTeam(s)" in out and "pull inbox holds notification" in out and ": delivered" in out
        assert len(receiver.accepted) == 1
        [body] = next(iter(receiver.accepted.values()))
        assert body["id"] in out and body["localAuthority"] == {"ods": "LA001"}
    finally:
        await server.close()
        await receiver.stop()
