"""SIGTERM during an upload, against `cpis-bridge serve` as a subprocess: the upload is answered before the grace
period ends, either 503 having applied nothing (still being read) or, once it is being applied, 503 with the upload
completed by the next process from its journal; never a closed connection with part of a file applied."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson
import redis.asyncio as aioredis

from cpis_bridge.core.nhs import iter_test_numbers
from cpis_bridge.store.keys import Keys
from tests.support.polling import wait_until
from tests.support.service import ServiceProcess
from tests.support.world import HASH_KEY, LA1, record

N = 20_000
GRACE = {"CPIS_SHUTDOWN_GRACE_S": "1", "CPIS_LOG_LEVEL": "WARNING"}


def caseload() -> list[dict]:
    numbers = [str(x) for _, x in zip(range(N), iter_test_numbers(), strict=False)]
    return [record(f"S{i}", nhs) for i, nhs in enumerate(numbers)]


def ndjson_headers(seq: int) -> dict[str, str]:
    return {**LA1, "Content-Type": "application/x-ndjson", "Upload-Sequence": str(seq), "Upload-Mode": "delta"}


async def test_sigterm_while_the_body_is_read_answers_503_and_applies_nothing(tmp_path, redis_url, key_prefix):
    svc = ServiceProcess(tmp_path / "var", redis_url=redis_url, key_prefix=key_prefix, env=GRACE).start()
    lines = b"\n".join(orjson.dumps(x) for x in caseload())
    half_sent, signalled = asyncio.Event(), asyncio.Event()

    async def body():
        yield lines[: len(lines) // 2]
        half_sent.set()  # asked for the next chunk: the first is written
        await signalled.wait()
        yield lines[len(lines) // 2 :]

    redis = aioredis.from_url(redis_url)
    keys = Keys(key_prefix, HASH_KEY.encode())
    try:
        async with aiohttp.ClientSession() as s:
            upload = asyncio.create_task(s.post(f"{svc.url}/v1/uploads", data=body(), headers=ndjson_headers(1)))
            await asyncio.wait_for(half_sent.wait(), 10)
            assert not upload.done()  # the signal lands mid-upload: half the body is still to come
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGTERM)
            # the process has taken the signal (not ready, or no longer listening) before the rest of the body is sent
            await asyncio.to_thread(wait_until, lambda: svc.status("/readyz") != 200, 10, 0.02, "stopping")
            signalled.set()
            r = await asyncio.wait_for(upload, 10)
            assert r.status == 503 and r.content_type == "application/problem+json"
            assert int(r.headers["Retry-After"]) > 0
        assert await asyncio.to_thread(svc.proc.wait, 30) == 0
        assert await redis.hlen(keys.la_ids("LA001")) == 0  # nothing applied
        assert not await redis.exists(keys.la_journal("LA001"), keys.la_uploads("LA001"), keys.la_lock("LA001"))
    finally:
        svc.stop()
        await redis.aclose()


async def test_sigterm_while_applying_answers_503_and_the_next_process_completes_it(tmp_path, redis_url, key_prefix):
    svc = ServiceProcess(tmp_path / "var", redis_url=redis_url, key_prefix=key_prefix, env=GRACE).start()
    items = caseload()
    lines = b"\n".join(orjson.dumps(x) for x in items)
    redis = aioredis.from_url(redis_url)
    keys = Keys(key_prefix, HASH_KEY.encode())
    ids = keys.la_ids("LA001")
    try:
        async with aiohttp.ClientSession() as s:
            upload = asyncio.create_task(s.post(f"{svc.url}/v1/uploads", data=lines, headers=ndjson_headers(1)))
            deadline = time.monotonic() + 60
            while await redis.hlen(ids) == 0:
                assert time.monotonic() < deadline and not upload.done()
                await asyncio.sleep(0.002)
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGTERM)
            applied_at_signal = await redis.hlen(ids)
            assert not upload.done() and 0 < applied_at_signal < N  # the signal landed mid-upload
            r = await asyncio.wait_for(upload, 10)  # answered, not dropped
            rep = await r.json()
        assert await asyncio.to_thread(svc.proc.wait, 30) == 0
        if r.status == 200:  # it finished inside the grace period
            assert rep["accepted"] == N and await redis.hlen(ids) == N
            return
        assert r.status == 503 and int(r.headers["Retry-After"]) > 0, rep
        # The next process completes the journalled upload by itself, then a re-send answers its report.
        svc = ServiceProcess(
            tmp_path / "var", redis_url=redis_url, key_prefix=key_prefix, env=GRACE, port=svc.port
        ).start()
        deadline = time.monotonic() + 60
        while await redis.exists(keys.la_journal("LA001")):
            assert time.monotonic() < deadline, "the restarted service did not complete the upload"
            await asyncio.sleep(0.1)
        assert await redis.hlen(ids) == N
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"{svc.url}/v1/uploads", data=lines, headers=ndjson_headers(1))
            rep = await r.json()
            assert r.status == 200 and rep["accepted"] == N and r.headers["Upload-Replayed"] == "true"
            last = items[-1]
            r = await s.get(f"{svc.url}/v1/records/{last['localId']}", headers=LA1)
            assert r.status == 200 and (await r.json())["nhsNumber"] == last["nhsNumber"]
    finally:
        svc.stop()
        await redis.aclose()
