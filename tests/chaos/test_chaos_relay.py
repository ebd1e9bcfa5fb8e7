"""Chaos (`make chaos`): one LA's webhook hangs (accepts, never answers) with thousands of notifications queued for
it while another LA's notification latency is measured under >= 1,000 accesses; then the hung endpoint recovers and
gets everything. A real `cpis-bridge serve` process, a real embedded Redis, real receivers on loopback."""

from __future__ import annotations

import asyncio
import secrets
import time

import aiohttp
import pytest

from tests.chaos.harness import ED, LoadResult, children, drive_accesses, load_children
from tests.support.polling import eventually
from tests.support.receivers import Receiver, webhook_block, webhook_secret, write_registry
from tests.support.service import ServiceProcess
from tests.support.world import NHS_SYSTEM, auth

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

HUNG_BACKLOG = 3000
MEASURED = 1200
RATE = 200.0
PREFIX = "chaosrelay"


async def paced_accesses(base: str, nhs_numbers: list[str], total: int, rate: float) -> LoadResult:
    """``total`` unscheduled look-ups started at a steady ``rate`` per second (open loop, like ED traffic)."""
    result = LoadResult()
    timeout = aiohttp.ClientTimeout(total=10)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nhs = nhs_numbers[i % len(nhs_numbers)]
        trace = f"measured-{i}-{secrets.token_hex(4)}"
        try:
            async with session.get(
                f"{base}/fhir/CareTeam",
                params={"patient:identifier": f"{NHS_SYSTEM}|{nhs}"},
                headers={**ED, "TraceID": trace, "IsUnscheduledAccessEvent": "true"},
            ) as r:
                await r.read()
                if 200 <= r.status < 300:
                    result.acknowledged[trace] = nhs
                else:
                    result.failed += 1
        except (aiohttp.ClientError, TimeoutError):
            result.failed += 1

    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        tasks = []
        for i in range(total):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
        await asyncio.gather(*tasks)
    return result


async def test_one_la_endpoint_hung_while_another_las_latency_is_measured(tmp_path, redis_server):
    healthy = await Receiver(webhook_secret()).start()
    hung = await Receiver(webhook_secret(), hung=True).start()
    registry = write_registry(
        tmp_path / "registry.yaml",
        {"LA001": webhook_block(healthy.url), "LA002": webhook_block(hung.url, "LA002_WEBHOOK_SECRET")},
    )
    svc = ServiceProcess(
        tmp_path / "svc",
        redis_url=redis_server.url,
        key_prefix=PREFIX,
        env={
            "CPIS_REGISTRY": str(registry),
            "LA001_WEBHOOK_SECRET": healthy.secret,
            "LA002_WEBHOOK_SECRET": hung.secret,
            "CPIS_LOG_LEVEL": "WARNING",
            "CPIS_DELIVERY_BREAKER_COOLDOWN_S": "5",  # default timeout (10 s) and cap (32)
        },
    ).start()
    try:
        la1, la2 = children(1000), children(200, start=5000)  # apart from LA001's
        async with aiohttp.ClientSession() as s:
            await load_children(s, svc.url, la1)
            await load_children(s, svc.url, la2, la_headers=auth("local-authority", "LA002"))
        queued = await drive_accesses([svc.url], la2, HUNG_BACKLOG, deadline_s=120)
        assert len(queued.acknowledged) >= HUNG_BACKLOG * 0.99, queued.failed
        assert hung.attempts, "the relay never tried the hung endpoint"

        measured = await paced_accesses(svc.url, la1, MEASURED, RATE)
        assert measured.failed == 0 and len(measured.acknowledged) == MEASURED
        want = set(measured.acknowledged)
        delivered = await eventually(lambda: want <= set(healthy.unique_source_events()), 30, step=0.2)
        assert delivered, f"{len(want - set(healthy.unique_source_events()))} of LA001's notifications never came"
        lat = healthy.latencies()
        p99 = lat[min(int(len(lat) * 0.99), len(lat) - 1)]
        print(
            f"\nLA001 access-to-receipt with LA002 hung ({HUNG_BACKLOG} queued): n={len(lat)} "
            f"p50={lat[len(lat) // 2] * 1000:.1f} ms p99={p99 * 1000:.1f} ms max={lat[-1] * 1000:.1f} ms; "
            f"attempts at the hung endpoint: {len(hung.attempts)}"
        )
        assert p99 <= 0.250, f"p99 {p99 * 1000:.0f} ms"
        assert len(hung.attempts) < 200, "the hung endpoint was hammered instead of held"

        hung.recover()
        owed = set(queued.acknowledged)
        recovered = await eventually(lambda: owed <= set(hung.unique_source_events()), 120, step=0.2)
        assert recovered, f"{len(owed - set(hung.unique_source_events()))} of LA002's notifications never came"
        assert healthy.bad_signatures == hung.bad_signatures == 0
        assert set(healthy.unique_source_events()) == want and set(hung.unique_source_events()) == owed
    finally:
        svc.stop()
        for receiver in (healthy, hung):
            receiver.recover()
            await receiver.stop()
