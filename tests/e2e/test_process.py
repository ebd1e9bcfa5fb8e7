"""Process-level guarantees: an acknowledged record survives kill -9 of the service and of the embedded Redis;
SIGTERM drains (readiness 503 first) and lets in-flight requests finish."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import orjson
import pytest

from tests.support.polling import wait_until
from tests.support.service import ServiceProcess
from tests.support.world import LA1, record

pytestmark = pytest.mark.slow


async def put(session: aiohttp.ClientSession, svc: ServiceProcess, lid: str) -> int:
    async with session.put(f"{svc.url}/v1/records/{lid}", json=record(lid), headers=LA1) as r:
        return r.status


async def get(session: aiohttp.ClientSession, svc: ServiceProcess, lid: str) -> int:
    async with session.get(f"{svc.url}/v1/records/{lid}", headers=LA1) as r:
        return r.status


async def test_records_survive_kill9_of_service_and_of_embedded_redis(tmp_path):
    svc = ServiceProcess(tmp_path / "var").start()
    try:
        async with aiohttp.ClientSession() as s:
            assert await put(s, svc, "A") == 201
            redis_pid = svc.redis_pid()
            # kill -9 the embedded Redis: the service's supervisor restarts it from the append-only file.
            os.kill(redis_pid, signal.SIGKILL)
            wait_until(
                lambda: (
                    (svc.data_dir / "redis.pid").exists()
                    and svc.redis_pid() != redis_pid
                    and svc.status("/readyz") == 200
                )
            )
            assert await get(s, svc, "A") == 200
            assert await put(s, svc, "B") == 201
            # kill -9 Redis and the service together, then start again: both records are still there.
            os.kill(svc.redis_pid(), signal.SIGKILL)
            svc.kill9()
        svc = ServiceProcess(tmp_path / "var", port=svc.port).start()
        async with aiohttp.ClientSession() as s:
            assert await get(s, svc, "A") == 200
            assert await get(s, svc, "B") == 200
    finally:
        svc.stop()


async def test_sigterm_drains_then_finishes_in_flight(tmp_path):
    """The signal provably lands mid-upload: half the body is sent, then SIGTERM, and the rest is held back until
    the process reports draining (/readyz 503), so the upload cannot have finished before the signal arrived."""
    svc = ServiceProcess(tmp_path / "var", env={"CPIS_DRAIN_DELAY_S": "1.5", "CPIS_SHUTDOWN_GRACE_S": "20"}).start()
    records = [record(f"R{i}", nhsNumber="9990000018") for i in range(8000)]
    body = orjson.dumps({"sequence": 1, "mode": "full", "recordCount": len(records), "records": records})
    half_sent, draining = asyncio.Event(), asyncio.Event()

    async def chunks():
        yield body[: len(body) // 2]
        half_sent.set()  # asked for the next chunk: the first is written
        await draining.wait()
        yield body[len(body) // 2 :]

    try:
        async with aiohttp.ClientSession() as s:
            upload = asyncio.create_task(
                s.post(f"{svc.url}/v1/uploads", data=chunks(), headers={**LA1, "Content-Type": "application/json"})
            )
            await asyncio.wait_for(half_sent.wait(), 10)
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until, lambda: svc.status("/readyz") == 503, 10, 0.02, "draining")
            assert not upload.done()
            draining.set()
            resp = await upload
            assert resp.status == 200
            assert (await resp.json())["accepted"] == 8000
        assert await asyncio.to_thread(svc.proc.wait, 30) == 0
    finally:
        svc.stop()
