"""Crash-safe uploads against real Redis: the per-LA lease (a dead holder's lapses; a re-send of the same sequence
waits for it), the journal an interrupted upload leaves (completed by the resumer or by a re-send, to exactly the
state the file describes), and the fence that stops a holder whose lease has gone from writing anything."""

import asyncio
import datetime as dt
import tempfile
import time

import orjson
import pytest

from cpis_bridge.app import KEYS, REDIS, create_app
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import today_london
from cpis_bridge.core.errors import UploadInterrupted
from cpis_bridge.core.nhs import iter_test_numbers
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.core.records import parse_record
from cpis_bridge.services.uploads import UploadControl, UploadMeta, UploadMode
from cpis_bridge.web.state import SERVICES
from tests.support.world import LA1, record

LA = "LA001"
NDJSON = "application/x-ndjson"


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


def ctx() -> AuditContext:
    return AuditContext(Principal(subject="u-la", role=Role.LOCAL_AUTHORITY, ods=LA), trace_id="tr-1")


def body_of(items: list[dict]):
    f = tempfile.TemporaryFile()
    f.write(b"\n".join(orjson.dumps(x) for x in items))
    f.seek(0)
    return f


def caseload(n: int, prefix: str = "R") -> list[dict]:
    numbers = [str(x) for _, x in zip(range(n), iter_test_numbers(), strict=False)]
    return [record(f"{prefix}{i}", nhs) for i, nhs in enumerate(numbers)]


async def state(app) -> dict[str, dict]:
    store = app[SERVICES].records.store
    ids = sorted(await store.index(LA))
    return {r.local_id: r.to_api(visible=True) for r in await store.get_many(LA, ids) if r is not None}


def assert_state_is(got: dict[str, dict], items: list[dict], ended: set[str]) -> None:
    """Every record of the file as sent; the records ``ended`` ended today; nothing else."""
    assert set(got) == {x["localId"] for x in items} | ended
    for x in items:
        assert {k: got[x["localId"]][k] for k in x} == x
    for lid in ended:
        assert got[lid]["endDate"] == today_london().isoformat()


async def interrupted_mid_apply(app, items: list[dict], seq: int, mode: UploadMode, confirm_end=None) -> int:
    """Start an upload and cancel it once some (not all) of its records are written; how many were."""
    uploads, redis, keys = app[SERVICES].uploads, app[REDIS], app[KEYS]
    before = await redis.hlen(keys.la_ids(LA))
    control = UploadControl()
    task = asyncio.ensure_future(
        uploads.apply_upload(
            ctx(),
            LA,
            UploadMeta(seq, mode, len(items)),
            NDJSON,
            body_of(items),
            control=control,
            confirm_end=confirm_end,
        )
    )
    deadline = time.monotonic() + 30
    while not (control.committed and await redis.hlen(keys.la_ids(LA)) > before):
        assert not task.done() and time.monotonic() < deadline, "the upload ended before it could be interrupted"
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    written = await redis.hlen(keys.la_ids(LA)) - before
    assert 0 < written < len(items), "the interruption did not land mid-upload"
    assert await redis.exists(keys.la_journal(LA))
    return written


N = 5000


async def test_interrupted_full_upload_is_completed_by_the_resumer(client):
    app = client.server.app
    old = caseload(40, prefix="R")
    report, _ = await app[SERVICES].uploads.apply_upload(
        ctx(), LA, UploadMeta(1, UploadMode.DELTA), NDJSON, body_of(old)
    )
    assert report["accepted"] == 40
    new = caseload(N, prefix="S") + old[:10]
    for x in new[::7]:
        x["endDate"] = "2026-02-01"
    await interrupted_mid_apply(app, new, 2, UploadMode.FULL, confirm_end=30)
    # Completed by this call, or by the app's own resumer if it looked first.
    deadline = time.monotonic() + 30
    while await app[REDIS].exists(app[KEYS].la_journal(LA)):
        assert time.monotonic() < deadline
        await app[SERVICES].uploads.resume([LA, "LA002"])
        await asyncio.sleep(0.05)
    absent = {x["localId"] for x in old[10:]}
    assert_state_is(await state(app), new, absent)
    r = await client.post(
        "/v1/uploads",
        data=b"\n".join(orjson.dumps(x) for x in new),
        headers={**LA1, "Content-Type": NDJSON, "Upload-Sequence": "2", "Upload-Mode": "full"},
    )
    rep = await r.json()
    assert r.status == 200 and r.headers["Upload-Replayed"] == "true"
    assert rep["accepted"] == len(new) and rep["ended"] == 30 and set(rep["endedLocalIds"]) == absent
    assert not await app[REDIS].exists(app[KEYS].la_journal(LA), app[KEYS].la_journal_body(LA))
    assert await app[SERVICES].uploads.resume([LA]) == 0


async def test_resend_completes_an_interrupted_delta(client):
    app = client.server.app
    items = caseload(N, prefix="D")
    await interrupted_mid_apply(app, items, 7, UploadMode.DELTA)
    r = await client.post(
        "/v1/uploads",
        data=b"\n".join(orjson.dumps(x) for x in items),
        headers={**LA1, "Content-Type": NDJSON, "Upload-Sequence": "7", "Upload-Mode": "delta"},
    )
    rep = await r.json()
    assert r.status == 200 and rep["accepted"] == N and rep["fileCode"] == "CPF02"
    assert_state_is(await state(app), items, set())
    audit = await app[REDIS].lrange(app[KEYS].audit(app[KEYS].tag(items[0]["nhsNumber"])), 0, -1)
    assert len(audit) == 1  # written once, though its batch may have been applied by both attempts


async def test_a_dead_holders_lease_lapses_and_a_resend_waits_for_it(client):
    app = client.server.app
    redis, keys = app[REDIS], app[KEYS]
    # What a process killed while applying sequence 3 leaves: its lease, with a little time left to run.
    await redis.set(keys.la_lock(LA), "3.deadbeefdeadbeef", px=1500)
    r = await client.post("/v1/uploads", json={"sequence": 4, "mode": "delta", "records": [record("A")]}, headers=LA1)
    assert r.status == 409  # another sequence: at once
    started = time.monotonic()
    r = await client.post("/v1/uploads", json={"sequence": 3, "mode": "delta", "records": [record("A")]}, headers=LA1)
    assert r.status == 200 and (await r.json())["fileCode"] == "CPF02"
    assert 1.0 < time.monotonic() - started < 8
    assert not await redis.exists(keys.la_lock(LA))  # released on finish


async def test_a_holder_that_lost_its_lease_writes_nothing(client):
    app = client.server.app
    redis, keys, uploads = app[REDIS], app[KEYS], app[SERVICES].uploads
    assert await uploads.store.acquire(LA, "9.stale", 10_000) is None
    await redis.delete(keys.la_lock(LA))  # lapsed while the holder was stalled
    assert await uploads.store.acquire(LA, "9.other", 10_000) is None  # and taken over
    rec = parse_record(record("A"), la=LA, today=today_london(), test_numbers_only=True)
    change = app[SERVICES].records.writes.change(rec, ctx().entry("upload.record", None, dt.datetime.now(dt.UTC)))
    with pytest.raises(UploadInterrupted):
        await app[SERVICES].records.store.apply(LA, [change], lease="9.stale")
    assert not await uploads.store.push_body(LA, "9.stale", b"x", first=True)
    assert not await uploads.store.commit(LA, "9.stale", b"{}")
    assert not await uploads.store.finish(LA, "9.stale", 9, b"{}")
    assert not await uploads.store.renew(LA, "9.stale", 10_000)
    assert await redis.hlen(keys.la_ids(LA)) == 0 and not await redis.exists(keys.la_journal_body(LA))
    await app[SERVICES].records.store.apply(LA, [change], lease="9.other")
    assert await redis.hlen(keys.la_ids(LA)) == 1


async def test_a_journal_that_cannot_be_read_back_is_dropped_not_left_to_block_the_la(client):
    app = client.server.app
    redis, keys = app[REDIS], app[KEYS]
    items = caseload(N, prefix="J")
    await interrupted_mid_apply(app, items, 3, UploadMode.DELTA)
    await redis.ltrim(keys.la_journal_body(LA), 0, 0)  # the store lost most of the body
    await redis.lset(keys.la_journal_body(LA), 0, b"{broken")
    r = await client.post(
        "/v1/uploads",
        data=b"\n".join(orjson.dumps(x) for x in items),
        headers={**LA1, "Content-Type": NDJSON, "Upload-Sequence": "3", "Upload-Mode": "delta"},
    )
    rep = await r.json()
    assert r.status == 200 and rep["accepted"] == N and "Upload-Replayed" not in r.headers
    assert_state_is(await state(app), items, set())
    assert not await redis.exists(keys.la_journal(LA))
