"""Flag sync through the real entry points: the app's own relay (cleanup_ctx) mirrors API writes and counts them
in /metrics; `cpis-bridge reconcile` (a subprocess) reports and repairs drift (duplicates too), exit 0 when in sync."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from cpis_bridge.app import create_app
from cpis_bridge.fhir.flag_sync import IDENTIFIER_SYSTEM, flag_id
from tests.support.polling import wait_for, wait_for_async
from tests.support.world import HASH_KEY, LA1, OPS, REGISTRY, record

pytestmark = pytest.mark.timeout(60)


async def test_the_app_relays_writes_and_erasures(aiohttp_client, make_settings, double):
    client = await aiohttp_client(create_app(make_settings(fhir_base_url=double.base_url)))
    r = await client.put("/v1/records/APP-1", json=record("APP-1"), headers=LA1)
    assert r.status == 201
    fid = flag_id("LA001", "APP-1")
    await wait_for(lambda: fid in double.flags)
    assert double.flags[fid]["status"] == "active"
    r = await client.delete("/v1/records/APP-1", headers=LA1)
    assert r.status == 204
    await wait_for(lambda: double.flags[fid]["status"] == "entered-in-error")
    delivered = 'cpis_deliveries_total{channel="flag-sync",outcome="delivered"} 2.0'

    async def counted() -> bool:  # the double holds the Flag before the relay has read its answer
        return delivered in await (await client.get("/metrics", headers=OPS)).text()

    await wait_for_async(counted, what="the relay did not count both deliveries")
    metrics = await (await client.get("/metrics", headers=OPS)).text()
    assert 'cpis_delivery_pending{channel="flag-sync"}' in metrics
    assert 'cpis_delivery_latency_seconds_count{channel="flag-sync"} 2.0' in metrics


async def test_relays_off_means_no_sync(aiohttp_client, make_settings, double):
    client = await aiohttp_client(create_app(make_settings(fhir_base_url=double.base_url, relays=False)))
    assert (await client.put("/v1/records/OFF", json=record("OFF"), headers=LA1)).status == 201
    await asyncio.sleep(0.3)
    assert double.flags == {}


async def _reconcile(settings, *args: str) -> tuple[int, dict]:
    env = {
        **os.environ,
        "CPIS_REDIS_URL": settings.redis_url,
        "CPIS_KEY_PREFIX": settings.key_prefix,
        "CPIS_LOG_HASH_KEY": HASH_KEY,
        "CPIS_FHIR_BASE_URL": settings.fhir_base_url,
        "CPIS_REGISTRY": str(REGISTRY),
        "CPIS_DATA_DIR": str(settings.data_dir),
        "CPIS_LOG_LEVEL": "WARNING",
    }
    exe = str(Path(sys.executable).parent / "cpis-bridge")
    proc = await asyncio.create_subprocess_exec(
        exe, "reconcile", "--quiet", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=40)
    assert proc.returncode in (0, 1), err.decode()[-2000:]
    return proc.returncode, json.loads(out.decode().strip().splitlines()[-1])


async def test_reconcile_repairs_drift(aiohttp_client, make_settings, double):
    settings = make_settings(fhir_base_url=double.base_url)
    client = await aiohttp_client(create_app(settings))
    for i in range(5):
        assert (await client.put(f"/v1/records/RC-{i}", json=record(f"RC-{i}"), headers=LA1)).status == 201
    await wait_for(lambda: len(double.flags) == 5)
    await wait_for(lambda: all(f["status"] == "active" for f in double.flags.values()))
    await client.close()  # stop the app's relay: the drift below must be found by reconcile alone
    del double.flags[flag_id("LA001", "RC-0")]  # missing
    double.flags[flag_id("LA001", "RC-1")]["status"] = "inactive"  # wrong status
    double.flags[flag_id("LA001", "RC-2")]["period"] = {"start": "2020-01-01"}  # wrong period
    double.flags["stray"] = {
        "resourceType": "Flag",
        "id": "stray",
        "status": "active",
        "meta": {"versionId": "1"},
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": "LA001|NO-SUCH"}],
        "subject": {"identifier": {"value": "9990000026"}},
    }  # ours, but no record
    other = double.add_duplicate("LA001|RC-3")  # a second Flag with our identifier, newer than ours
    code, report = await _reconcile(settings, "--dry-run")
    assert code == 1 and report["drift"] == {"missing": 1, "wrong": 2, "extra": 1, "duplicates": 1, "failed": 0}
    assert double.flags[other]["status"] == "active", "a dry run changes nothing"
    code, report = await _reconcile(settings)
    assert code == 0 and report["inSync"] is True and report["repaired"] == 5
    assert double.flags["stray"]["status"] == "entered-in-error"
    assert double.flags[other]["status"] == "entered-in-error", "the copy goes, the Flag with our id stays"
    assert double.flags[flag_id("LA001", "RC-3")]["status"] == "active"
    assert double.flags[flag_id("LA001", "RC-0")]["status"] == "active"
    assert double.flags[flag_id("LA001", "RC-2")]["period"] == {"start": "2026-01-10"}
    assert report["after"] == {"missing": 0, "wrong": 0, "extra": 0, "duplicates": 0, "failed": 0}
