"""The access step against real Redis: visibility, idempotency, one notification per owning LA, 25-entry history,
recent accesses read by reference."""

import datetime as dt

import orjson
import pytest

from cpis_bridge.app import KEYS, REDIS, SCRIPTS, create_app
from cpis_bridge.core.access import Access, notification_id
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.services.delivery import render
from cpis_bridge.store.inbox import RedisInbox, fill_recent
from cpis_bridge.store.retention import RedisRetentionStore
from cpis_bridge.store.scripts import Scripts
from cpis_bridge.web.state import REGISTRY, SERVICES
from tests.support.world import record

pytestmark = pytest.mark.no_relays


@pytest.fixture
async def app(aiohttp_client, make_settings):
    # relays off: these tests inspect the delivery queue, which running relays would drain
    c = await aiohttp_client(create_app(make_settings(relays=False)))
    return c.app


def ctx(role: Role, ods: str) -> AuditContext:
    return AuditContext(Principal(subject=f"u-{ods}", role=role, ods=ods, name="Test User", role_code="R0001"))


async def flagged_child_accessed(app, count: int, nhs: str = "9990000018") -> NhsNumber:
    """LA001 flags the child, then RXX01 looks it up ``count`` times (source events e0, e1, ...)."""
    await app[SERVICES].records.put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-1", record("A-1"))
    ed = app[REGISTRY].care_settings["RXX01"]
    for i in range(count):
        await app[SERVICES].access.lookup(
            ctx(Role.CARE_SETTING, "RXX01"),
            LookupRequest(nhs=NhsNumber(nhs), care_setting=ed, kind="careteam", source_event_id=f"e{i}"),
        )
    return NhsNumber(nhs)


async def test_two_las_one_notification_each_with_own_records(app):
    nhs = NhsNumber("9990000018")
    records = app[SERVICES].records
    await records.put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-1", record("A-1"))
    await records.put(ctx(Role.LOCAL_AUTHORITY, "LA002"), "LA002", "B-1", record("B-1", planType="LAC"))
    ed = app[REGISTRY].care_settings["RXX01"]
    out = await app[SERVICES].access.lookup(
        ctx(Role.CARE_SETTING, "RXX01"), LookupRequest(nhs=nhs, care_setting=ed, kind="careteam", source_event_id="t-1")
    )
    assert out.status == 1 and len(out.records) == 2
    again = await app[SERVICES].access.lookup(
        ctx(Role.CARE_SETTING, "RXX01"), LookupRequest(nhs=nhs, care_setting=ed, kind="careteam", source_event_id="t-1")
    )
    assert again.status == 2 and again.access_id == out.access_id
    redis, keys = app[REDIS], app[KEYS]
    assert await redis.xlen(keys.notify_queue) == 0  # neither LA has a push channel: nothing for the relays
    for la, lid in (("LA001", "A-1"), ("LA002", "B-1")):
        [(eid, fields)] = await redis.xrange(keys.inbox(la))
        assert [r["localId"] for r in orjson.loads(fields["recs"])] == [lid]
        assert await redis.hgetall(keys.inbox_index(la)) == {notification_id(out.access_id, la): eid}


async def test_silent_and_unflagged_record_nothing(app):
    gp = app[REGISTRY].care_settings["GP001"]
    await app[SERVICES].records.put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-1", record("A-1"))
    out = await app[SERVICES].access.lookup(
        ctx(Role.CARE_SETTING, "GP001"), LookupRequest(nhs=NhsNumber("9990000018"), care_setting=gp, kind="careteam")
    )
    assert out.status == 0 and len(out.records) == 1
    ed = app[REGISTRY].care_settings["RXX01"]
    out = await app[SERVICES].access.lookup(
        ctx(Role.CARE_SETTING, "RXX01"), LookupRequest(nhs=NhsNumber("9990000026"), care_setting=ed, kind="careteam")
    )
    assert out.status == 0 and out.records == []
    redis, keys = app[REDIS], app[KEYS]
    assert await redis.xlen(keys.notify_queue) == 0
    assert await redis.llen(keys.accesses(keys.tag("9990000026"))) == 0
    [entry] = await redis.lrange(keys.audit(keys.tag("9990000026")), 0, -1)
    assert orjson.loads(entry)["nhsNumber"] is None


async def test_history_keeps_newest_25(app):
    nhs = await flagged_child_accessed(app, 30)
    visible, history = await app[SERVICES].access.history(nhs)
    assert [a.source_event_id for _, a in history] == [f"e{i}" for i in range(29, 4, -1)]
    assert visible and all(isinstance(a.occurred_at, dt.datetime) for _, a in history)


async def test_each_notification_keeps_its_own_25_recent_by_reference(app):
    """The inbox entry refers to the child's access log instead of copying 25 accesses: every notification still reads
    back the access and the 24 before it, fixed when queued, however many accesses came after; a purge by age leaves
    it the ones still held."""
    nhs = await flagged_child_accessed(app, 40)
    redis, keys = app[REDIS], app[KEYS]
    stored = [f for _, f in await redis.xrange(keys.inbox("LA001"))]
    assert len(stored) == 40 and all("recent" not in f for f in stored)
    assert [int(f["n"]) for f in stored] == list(range(1, 41))
    inbox = RedisInbox(redis, keys, app[SCRIPTS])
    rows = await inbox.page("LA001", None, 100)
    bodies = [render("LA001", f).body for _, f, _ in rows]
    for i, body in enumerate(bodies):
        assert body["access"]["sourceEventId"] == f"e{i}"
        assert [a["sourceEventId"] for a in body["recentAccesses"]] == [f"e{j}" for j in range(i, max(i - 25, -1), -1)]
        assert body["recentAccesses"][0] == body["access"]
    # Purge by age: the accesses before e5 go; e10's notification keeps e10..e5, e30's is whole.
    log = await redis.lrange(keys.accesses(keys.tag(str(nhs))), 0, -1)
    cutoff = Access.decode(log[-6]).occurred_at  # e5
    removed = await RedisRetentionStore(redis, keys, Scripts(redis)).trim_accesses(int(cutoff.timestamp() * 1000))
    kept = {Access.decode(x).source_event_id for x in await redis.lrange(keys.accesses(keys.tag(str(nhs))), 0, -1)}
    assert removed == 40 - len(kept) and "e0" not in kept and "e5" in kept
    after = [render("LA001", f).body for _, f, _ in await inbox.page("LA001", None, 100)]
    assert after[30] == bodies[30]
    assert [a["sourceEventId"] for a in after[10]["recentAccesses"]] == [
        f"e{j}" for j in range(10, -1, -1) if f"e{j}" in kept
    ]


async def test_inbox_recent_script_finds_the_access_wherever_removals_moved_it(app):
    """inbox_recent.lua against a log edited the ways the service edits it: pushes at the head, removals anywhere
    (purge), the length cap trimming the tail."""
    redis, keys = app[REDIS], app[KEYS]
    log = keys.accesses("t-script")
    script = Scripts(redis).register("inbox_recent")
    model: list[str] = []  # the same edits on a Python list, newest first
    for i in range(100):
        await redis.lpush(log, f"a{i}")
        model.insert(0, f"a{i}")

    async def recent(i: int) -> list[str]:
        return str(await script(keys=[log], args=[f"a{i}", i + 1])).split("\x1e")

    def expected(i: int) -> list[str]:
        at = model.index(f"a{i}") if f"a{i}" in model else -1
        return model[at : at + 25] if at >= 0 else [f"a{i}"]

    assert await recent(40) == expected(40) == [f"a{j}" for j in range(40, 15, -1)]
    assert await recent(3) == ["a3", "a2", "a1", "a0"]
    for gone in ("a95", "a20"):  # a newer entry removed (the estimate falls short, the search goes on); an older one
        await redis.lrem(log, 1, gone)
        model.remove(gone)
    assert await recent(40) == expected(40) == [f"a{j}" for j in range(40, 14, -1) if j != 20]
    for i in range(100, 180):  # 80 more pushes under a cap of 100: a40 is gone, a90 far from its estimate
        await redis.lpush(log, f"a{i}")
        await redis.ltrim(log, 0, 99)
        model = [f"a{i}", *model][:100]
    assert await recent(40) == ["a40"]
    for i in (90, 99, 120, 179):  # a120's 25 run past the first 64-entry chunk read from its estimate
        assert await recent(i) == expected(i)
    assert len(expected(120)) == 25
    await redis.delete(log)
    entries: list[object] = [{"tag": "t-script", "acc": "a1", "n": "2"}, None, {"tag": "t-script"}]
    await fill_recent(redis, keys, script, entries)  # one round trip for all; a broken entry fails alone
    assert entries[0] == {"tag": "t-script", "acc": "a1", "n": "2", "recent": "a1"} and entries[1] is None
    assert isinstance(entries[2], KeyError)


async def test_access_log_is_capped_at_1000_and_notifications_still_read_their_25(app):
    nhs = await flagged_child_accessed(app, 1010)
    redis, keys = app[REDIS], app[KEYS]
    log = await redis.lrange(keys.accesses(keys.tag(str(nhs))), 0, -1)
    assert len(log) == 1000 and Access.decode(log[0]).source_event_id == "e1009"
    assert Access.decode(log[-1]).source_event_id == "e10"
    rows = await RedisInbox(redis, keys, app[SCRIPTS]).page("LA001", None, 2000)
    assert len(rows) == 1010
    bodies = {b["access"]["sourceEventId"]: b for b in (render("LA001", f).body for _, f, _ in rows)}
    for i in (1009, 1000, 990, 500, 34):  # positions the cap moved away from their estimate
        got = [a["sourceEventId"] for a in bodies[f"e{i}"]["recentAccesses"]]
        assert got == [f"e{j}" for j in range(i, i - 25, -1)]
    # e20's older accesses e9..e0 fell off the log's end: it lists the ones still held; e5 itself fell off.
    assert [a["sourceEventId"] for a in bodies["e20"]["recentAccesses"]] == [f"e{j}" for j in range(20, 9, -1)]
    assert [a["sourceEventId"] for a in bodies["e5"]["recentAccesses"]] == ["e5"]
