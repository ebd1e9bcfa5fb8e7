"""``cpis-bridge demo``: against a running service (dev tokens), the whole path once: an LA uploads a record, an
unscheduled care setting looks the child up, the LA's pull inbox shows the notification and, when the LA has a
webhook, it is delivered."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
import uuid
from typing import Any

import aiohttp
import orjson

from cpis_bridge.auth import dev_token
from cpis_bridge.bootstrap import dev_secret
from cpis_bridge.config import Settings
from cpis_bridge.core.principal import Role
from cpis_bridge.fhir.formats import JSON_CT
from cpis_bridge.registry import load_registry


async def _demo_json(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, orjson.loads(text) if text else None
        except ValueError:
            return resp.status, text


async def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Against a running service: upload a demo record, look the child up as an unscheduled care setting, then show
    the notification in the LA's pull inbox and, when the LA has a webhook, that it was delivered."""
    if not settings.dev_mode:
        print("cpis-bridge demo: refused: it needs dev tokens, and production auth is configured", file=sys.stderr)
        return 2
    registry = load_registry(settings.registry)
    la = registry.local_authorities.get(args.la) if args.la else next(iter(registry.local_authorities.values()), None)
    cs = (
        registry.care_settings.get(args.care_setting)
        if args.care_setting
        else next((c for c in registry.care_settings.values() if c.unscheduled), None)
    )
    if la is None or cs is None or not cs.unscheduled:
        print("cpis-bridge demo: the registry needs a local authority and an unscheduled care setting", file=sys.stderr)
        return 2
    secret = dev_secret(settings)
    h_la = {"Authorization": "Bearer " + dev_token(secret, role=Role.LOCAL_AUTHORITY, ods=la.ods, ttl_s=600)}
    h_cs = {
        "Authorization": "Bearer "
        + dev_token(secret, role=Role.CARE_SETTING, ods=cs.ods, name="Demo Clinician", role_code="R8000", ttl_s=600)
    }
    h_ops = {"Authorization": "Bearer " + dev_token(secret, role=Role.OPS, ods="OPS", ttl_s=600)}
    base = (args.url or settings.base_url).rstrip("/")
    nhs, local_id, trace = args.nhs_number, f"DEMO-{args.nhs_number}", str(uuid.uuid4())
    today = dt.datetime.now(dt.UTC).date().isoformat()
    body = {
        "localId": local_id,
        "planType": "CPP",
        "nhsNumber": nhs,
        "dateOfBirth": "2016-04-02",
        "startDate": today,
        "endDate": None,
    }
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status, _ = await _demo_json(session, "PUT", f"{base}/v1/records/{local_id}", json=body, headers=h_la)
        print(f"1. {la.ods} uploaded record {local_id}: HTTP {status}")
        if status not in (200, 201):
            return 1
        dead_before = await _webhook_dead(session, base, h_ops) if la.webhook else 0
        status, bundle = await _demo_json(
            session,
            "GET",
            f"{base}/fhir/CareTeam",
            params={"patient:identifier": f"https://fhir.nhs.uk/Id/nhs-number|{nhs}"},
            headers={**h_cs, "IsUnscheduledAccessEvent": "true", "TraceID": trace, "Accept": JSON_CT},
        )
        total = bundle.get("total") if isinstance(bundle, dict) else None
        print(f"2. {cs.ods} ({cs.name}) looked the child up, unscheduled: HTTP {status}, {total} CareTeam(s)")
        if status != 200:
            return 1
        found = await _find_notification(session, base, h_la, trace, args.wait)
        if found is None:
            print(f"3. no notification for this access in {la.ods}'s inbox after {args.wait:.0f} s")
            return 1
        print(f"3. {la.ods}'s pull inbox holds notification {found['id']}:")
        print(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        if la.webhook is None:
            print(f"4. {la.ods} has no webhook: the pull inbox is its channel")
            return 0
        state = await _webhook_settled(session, base, h_ops, dead_before, args.wait)
        print(f"4. webhook {la.webhook.url}: {state}")
        return 0 if state == "delivered" else 1


async def _find_notification(
    session: aiohttp.ClientSession, base: str, headers: dict[str, str], trace: str, wait_s: float
) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait_s
    cursor: str | None = None
    while True:
        params = {"limit": "1000", **({"after": cursor} if cursor else {})}
        status, page = await _demo_json(session, "GET", f"{base}/v1/notifications", params=params, headers=headers)
        if status != 200:
            return None
        for item in page["notifications"]:
            if item["access"]["sourceEventId"] == trace:
                return dict(item)
        cursor = page["next"]
        if not page["notifications"]:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.2)


async def _webhook_dead(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> int:
    status, body = await _demo_json(session, "GET", f"{base}/v1/admin/deliveries", headers=headers)
    return int(body["channels"]["webhook"]["dead"]) if status == 200 else 0


async def _webhook_settled(
    session: aiohttp.ClientSession, base: str, headers: dict[str, str], dead_before: int, wait_s: float
) -> str:
    """'delivered' once the webhook channel has nothing pending or retrying and no new dead letter."""
    deadline = time.monotonic() + wait_s
    while True:
        status, body = await _demo_json(session, "GET", f"{base}/v1/admin/deliveries", headers=headers)
        if status != 200:
            return f"cannot read the delivery state (HTTP {status})"
        w = body["channels"]["webhook"]
        if w["dead"] > dead_before:
            return "dead-lettered (see GET /v1/admin/deliveries)"
        if w["pending"] == 0 and w["retrying"] == 0:
            return "delivered"
        if time.monotonic() > deadline:
            return f"not yet delivered: {w['pending']} pending, {w['retrying']} retrying"
        await asyncio.sleep(0.2)
