"""What the delivery tests share: an app factory with webhook/FHIR LAs (real receivers from tests/support/receivers.py),
records to flag a child, and unscheduled look-ups that queue its notifications."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpis_bridge.app import create_app
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.web.state import REGISTRY, SERVICES
from tests.support.receivers import Receiver, write_registry
from tests.support.world import record

NHS = "9990000018"


def ctx(role: Role, ods: str) -> AuditContext:
    return AuditContext(Principal(subject=f"u-{ods}", role=role, ods=ods, name="Test User", role_code="R0001"))


async def flag(app: Any, la: str = "LA001", lid: str = "A-1", nhs: str = NHS, **kw: Any) -> None:
    await app[SERVICES].records.put(ctx(Role.LOCAL_AUTHORITY, la), la, lid, record(lid, nhs, **kw))


async def access(app: Any, event: str, nhs: str = NHS, cs: str = "RXX01") -> Any:
    out = await app[SERVICES].access.lookup(
        ctx(Role.CARE_SETTING, cs),
        LookupRequest(
            nhs=NhsNumber(nhs), care_setting=app[REGISTRY].care_settings[cs], kind="careteam", source_event_id=event
        ),
    )
    assert out.status == 1
    return out


def webhook(r: Receiver, env: str = "LA001_WEBHOOK_SECRET") -> dict[str, Any]:
    return {"webhook": {"url": r.url, "secretEnv": env}}


def client_factory(make_settings: Any, aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``await make(las, secrets, **settings)``: a served app whose registry gives LA001/LA002 the ``notify`` blocks
    in ``las``, with a short delivery timeout and breaker cool-down; several apps made in one test share the Redis
    key prefix."""
    count = 0

    async def make(las: dict[str, dict[str, Any]], secrets: dict[str, str] | None = None, **overrides: Any) -> Any:
        nonlocal count
        count += 1
        for name, value in (secrets or {}).items():
            monkeypatch.setenv(name, value)
        values = {
            "delivery_timeout_s": 0.3,
            "relay_claim_idle_s": 2.0,
            "relay_reclaim_interval_s": 0.2,
            "delivery_breaker_cooldown_s": 0.5,
        }
        values.update(overrides)
        settings = make_settings(registry=write_registry(tmp_path / f"registry{count}.yaml", las), **values)
        return await aiohttp_client(create_app(settings))

    return make
