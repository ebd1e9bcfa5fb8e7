"""`cpis-bridge demo` against a running app: record, unscheduled CareTeam look-up, inbox, webhook delivery."""

from __future__ import annotations

import argparse
from typing import Any

from aiohttp.test_utils import TestServer

from cpis_bridge.app import create_app
from cpis_bridge.demo import run_demo
from tests.support.receivers import Receiver, write_registry


async def test_demo_shows_the_notification_and_its_webhook_delivery(
    make_settings, tmp_path, monkeypatch, capsys: Any
) -> None:
    receiver = await Receiver().start()
    monkeypatch.setenv("LA001_WEBHOOK_SECRET", receiver.secret)
    registry = write_registry(
        tmp_path / "registry.yaml", {"LA001": {"webhook": {"url": receiver.url, "secretEnv": "LA001_WEBHOOK_SECRET"}}}
    )
    settings = make_settings(registry=registry)
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        args = argparse.Namespace(
            la=None, care_setting=None, nhs_number="9990000018", url=str(server.make_url("")), wait=10.0
        )
        assert await run_demo(settings, args) == 0
        out = capsys.readouterr().out
        assert "1 CareTeam(s)" in out and "pull inbox holds notification" in out and ": delivered" in out
        assert len(receiver.accepted) == 1
        [body] = next(iter(receiver.accepted.values()))
        assert body["id"] in out and body["localAuthority"] == {"ods": "LA001"}
    finally:
        await server.close()
        await receiver.stop()
