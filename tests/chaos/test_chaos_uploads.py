"""`make chaos`: `kill -9` of the service at a random point of a large full upload, then a restart. A re-send of the
same sequence at once is accepted (never 409), and without one the restarted service completes a journalled upload
by itself; either way the LA ends in exactly the state the file describes, checked record by record."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis as redis_sync

from cpis_bridge.core.clock import today_london
from cpis_bridge.core.records import Record
from cpis_bridge.store.keys import Keys
from tests.chaos.harness import LA1, children
from tests.support.polling import eventually
from tests.support.service import ServiceProcess
from tests.support.world import HASH_KEY, record

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

PREFIX = "chaosup"
LA = "LA001"
HELD = 30_000  # records the LA holds before the full upload
KEPT = 27_000  # of those, named again by the full upload (some changed); the other 3,000 are ended
NEW = 40_000  # records the full upload adds


def service(tmp_path: Path, redis_url: str) -> ServiceProcess:
    return ServiceProcess(
        tmp_path / "svc",
        redis_url=redis_url,
        key_prefix=PREFIX,
        env={"CPIS_LOG_LEVEL": "WARNING", "CPIS_RELAYS": "false"},
    )


def files() -> tuple[list[dict], list[dict]]:
    numbers = children(HELD + NEW)
    held = [record(f"K{i}", nhs) for i, nhs in enumerate(numbers[:HELD])]
    full = [dict(x) for x in held[:KEPT]]
    for x in full[::5]:
        x["planType"], x["lacLegalBasis"] = "LAC", "C2"
    for x in full[1::5]:
        x["endDate"] = "2026-02-01"
    full += [record(f"N{i}", nhs) for i, nhs in enumerate(numbers[HELD:])]
    random.shuffle(full)  # new and changed records spread through the file
    return held, full


def la_state(redis_url: str) -> dict[str, dict]:
    keys = Keys(PREFIX, HASH_KEY.encode())
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        index = client.hgetall(keys.la_ids(LA))
        pipe = client.pipeline(transaction=False)
        for lid, nhs in index.items():
            pipe.hget(keys.records(keys.tag(nhs)), Keys.record_field(LA, lid))
        return {
            lid: Record.from_compact(LA, lid, orjson.loads(raw)).to_api(visible=True)
            for lid, raw in zip(index, pipe.execute(), strict=True)
        }
    finally:
        client.close()


def assert_exactly(state: dict[str, dict], held: list[dict], full: list[dict]) -> None:
    named = {x["localId"] for x in full}
    ended = {x["localId"] for x in held} - named
    assert set(state) == named | ended
    wrong = [x["localId"] for x in full if {k: state[x["localId"]][k] for k in x} != x]
    assert wrong == [], f"{len(wrong)} records differ from the file, e.g. {wrong[:3]}"
    today = today_london().isoformat()
    assert all(state[lid]["endDate"] == today for lid in ended)


def journal_committed(redis_url: str) -> bool:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        return bool(client.exists(Keys(PREFIX, HASH_KEY.encode()).la_journal(LA)))
    finally:
        client.close()


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> aiohttp.ClientResponse:
    return await session.post(f"{url}/v1/uploads", data=body, headers={**LA1, "Content-Type": "application/json"})


@pytest.mark.parametrize(("kill_at", "then"), [("reading", "resend"), ("applying", "resend"), ("applying", "wait")])
async def test_kill9_mid_upload_then_resend_or_restart(tmp_path, redis_server, kill_at, then):
    held, full = files()
    body = orjson.dumps({"sequence": 2, "mode": "full", "recordCount": len(full), "records": full})
    svc = service(tmp_path, redis_server.url).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            r = await s.post(
                f"{svc.url}/v1/uploads",
                headers={**LA1, "Content-Type": "application/json"},
                data=orjson.dumps({"sequence": 1, "mode": "delta", "records": held}),
            )
            assert r.status == 200 and (await r.json())["accepted"] == HELD
            upload = asyncio.create_task(post(s, svc.url, body))
            if kill_at == "reading":  # a random moment before anything is applied
                await asyncio.sleep(random.uniform(0.0, 0.6))
            else:  # a random share of the new records written
                target = HELD + int(NEW * random.uniform(0.05, 0.9))
                keys = Keys(PREFIX, HASH_KEY.encode())
                client = redis_sync.Redis.from_url(redis_server.url)
                try:
                    assert await eventually(lambda: client.hlen(keys.la_ids(LA)) >= target, 120, step=0.005)
                finally:
                    client.close()
            assert not upload.done(), "the upload finished before the kill"
            svc.kill9()
            with pytest.raises(aiohttp.ClientError):
                await upload
            applied_at_kill = len(la_state(redis_server.url)) - HELD
            if kill_at == "applying":
                assert 0 < applied_at_kill < NEW  # the kill landed mid-apply: the file is half applied
        svc = service(tmp_path, redis_server.url).start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            if then == "wait":
                assert await eventually(lambda: not journal_committed(redis_server.url), 120, step=0.1), (
                    "the restarted service did not complete the journalled upload"
                )
                assert_exactly(la_state(redis_server.url), held, full)
            started = time.monotonic()
            r = await post(s, svc.url, body)
            rep = await r.json()
            assert r.status == 200, rep  # accepted at once: no lock of the dead process in the way
            assert rep["fileCode"] == "CPF02" and rep["accepted"] == len(full) and rep["ended"] == HELD - KEPT
            assert time.monotonic() - started < 120
        assert_exactly(la_state(redis_server.url), held, full)
        assert not journal_committed(redis_server.url)
    finally:
        svc.stop()
