"""Retention purge and subject-access export against real Redis: what goes, what stays, both audited."""

import datetime as dt
import os
import subprocess
import sys

import orjson
import pytest

from cpis_bridge.app import KEYS, REDIS, create_app
from cpis_bridge.compose import open_services
from cpis_bridge.core.access import instant
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.access import AccessService, LookupRequest
from cpis_bridge.store.embedded import socket_answers
from cpis_bridge.web.state import REGISTRY, SERVICES
from tests.support.world import HASH_KEY, record

CHILD_A = "9990000018"
CHILD_B = "9990000026"
OPS_CTX = AuditContext(Principal(subject="ops-test", role=Role.OPS, ods="OPS"))


def ctx(role: Role, ods: str) -> AuditContext:
    return AuditContext(Principal(subject=f"u-{ods}", role=role, ods=ods, name="Test User", role_code="R0001"))


@pytest.fixture
async def app(aiohttp_client, settings):
    c = await aiohttp_client(create_app(settings))
    return c.app


async def lookup(app, nhs: str, event: str, *, clock=None, encounter=None):
    service = (
        app[SERVICES].access
        if clock is None
        else AccessService(app[SERVICES].access.store, windows=app[SERVICES].access.windows, clock=clock)
    )
    ed = app[REGISTRY].care_settings["RXX01"]
    return await service.lookup(
        ctx(Role.CARE_SETTING, "RXX01"),
        LookupRequest(nhs=NhsNumber(nhs), care_setting=ed, kind="careteam", source_event_id=event, encounter=encounter),
    )


async def test_purge_removes_only_what_is_past_retention(app, settings):
    redis, keys, records = app[REDIS], app[KEYS], app[SERVICES].records
    la = ctx(Role.LOCAL_AUTHORITY, "LA001")
    now = dt.datetime.now(dt.UTC)
    # Inbox entries with explicit old ids go first (stream ids only grow): one acknowledged, one not.
    old_ms = int((now - dt.timedelta(days=100)).timestamp() * 1000)
    acked_old = await redis.xadd(keys.inbox("LA001"), {"tag": "x", "at": str(old_ms)}, id=f"{old_ms}-0")
    unacked_old = await redis.xadd(keys.inbox("LA001"), {"tag": "x", "at": str(old_ms)}, id=f"{old_ms}-1")
    await redis.sadd(keys.inbox_acks("LA001"), acked_old)
    await redis.hset(keys.inbox_acks_by("LA001"), acked_old, f"{old_ms}\x1fdev:Sam Duty\x1fSam Duty")

    # Ended in 2020: visibility ended 2020-12-31 (364 days), long past the 90 days kept. Another, still visible.
    await records.put(la, "LA001", "OLD-1", record("OLD-1", CHILD_A, startDate="2019-01-01", endDate="2020-01-02"))
    await records.put(la, "LA001", "NEW-1", record("NEW-1", CHILD_B, startDate="2019-01-01"))
    recent_end = (now.date() - dt.timedelta(days=10)).isoformat()
    await records.put(la, "LA001", "ENDED-1", record("ENDED-1", CHILD_B, startDate="2019-01-01", endDate=recent_end))

    # Accesses: one 800 days ago (past 730), one now.
    await lookup(app, CHILD_B, "old", clock=lambda: now - dt.timedelta(days=800))
    await lookup(app, CHILD_B, "new")
    new_entries = await redis.xrange(keys.inbox("LA001"), min=f"({unacked_old}")
    assert len(new_entries) == 2
    await redis.sadd(keys.inbox_acks("LA001"), *[eid for eid, _ in new_entries])

    # Audit: an entry 9 years old at the old end of the child's list and of the system list.
    ancient = orjson.dumps({"at": instant(now - dt.timedelta(days=9 * 366)), "action": "record.read"})
    await redis.rpush(keys.audit(keys.tag(CHILD_B)), ancient)
    await redis.rpush(keys.system_audit, ancient)
    child_audit_before = await redis.llen(keys.audit(keys.tag(CHILD_B)))

    async with open_services(settings) as opened:
        service = opened.retention
        counts = await service.purge(OPS_CTX)
        assert counts == {"records": 1, "accesses": 1, "inboxEntries": 1, "auditEntries": 2}
        again = await service.purge(OPS_CTX)
        assert again == {"records": 0, "accesses": 0, "inboxEntries": 0, "auditEntries": 0}

    assert await redis.hgetall(keys.records(keys.tag(CHILD_A))) == {}
    assert await redis.hget(keys.la_ids("LA001"), "OLD-1") is None
    assert set(await redis.hkeys(keys.records(keys.tag(CHILD_B)))) == {"LA001|NEW-1", "LA001|ENDED-1"}
    assert set(await redis.hkeys(keys.la_ids("LA001"))) == {"NEW-1", "ENDED-1"}
    history = await redis.lrange(keys.accesses(keys.tag(CHILD_B)), 0, -1)
    assert [h.split("\x1f")[1] for h in history] == ["new"]
    remaining = [eid for eid, _ in await redis.xrange(keys.inbox("LA001"))]
    assert acked_old not in remaining and unacked_old in remaining and len(remaining) == 3
    assert not await redis.sismember(keys.inbox_acks("LA001"), acked_old)
    assert not await redis.hexists(keys.inbox_acks_by("LA001"), acked_old)  # who acknowledged goes with it
    child_audit = [orjson.loads(x) for x in await redis.lrange(keys.audit(keys.tag(CHILD_B)), 0, -1)]
    assert len(child_audit) == child_audit_before - 1
    purged = [orjson.loads(x) for x in await redis.lrange(keys.audit(keys.tag(CHILD_A)), 0, -1)]
    assert purged[0]["action"] == "record.purged" and purged[0]["detail"] == {"la": "LA001", "localId": "OLD-1"}
    system = [orjson.loads(x) for x in await redis.lrange(keys.system_audit, 0, -1)]
    runs = [e for e in system if e["action"] == "retention.purge"]
    assert [r["detail"]["removed"] for r in runs] == [again, counts]
    assert runs[0]["actor"] == "ops-test" and runs[0]["detail"]["policy"]["recordDays"] == 90


async def test_export_gathers_everything_for_one_number_and_is_audited(app, settings):
    redis, keys, records = app[REDIS], app[KEYS], app[SERVICES].records
    await records.put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-1", record("A-1", CHILD_A))
    await records.put(ctx(Role.LOCAL_AUTHORITY, "LA002"), "LA002", "B-1", record("B-1", CHILD_A, planType="LAC"))
    await records.put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-2", record("A-2", CHILD_B))
    out = await lookup(app, CHILD_A, "ev-1", encounter={"resourceType": "Encounter", "status": "arrived"})
    await lookup(app, CHILD_B, "ev-2")
    [(first_id, _)] = await redis.xrange(keys.inbox("LA001"), count=1)
    await redis.sadd(keys.inbox_acks("LA001"), first_id)

    async with open_services(settings) as opened:
        service = opened.retention
        data = await service.export(OPS_CTX, NhsNumber(CHILD_A))
    assert data["nhsNumber"] == CHILD_A
    assert {la: [r["localId"] for r in recs] for la, recs in data["records"].items()} == {
        "LA001": ["A-1"],
        "LA002": ["B-1"],
    }
    assert data["records"]["LA001"][0]["givenName"] == "Testchild"
    [access] = data["accesses"]
    assert access["id"] == out.access_id and access["sourceEventId"] == "ev-1"
    assert access["encounter"] == {"resourceType": "Encounter", "status": "arrived"}
    inbox = data["inboxNotifications"]
    assert sorted(n["la"] for n in inbox) == ["LA001", "LA002"]
    assert all(n["access"]["id"] == out.access_id for n in inbox)
    assert [n["acknowledged"] for n in inbox if n["la"] == "LA001"] == [True]
    actions = {e["action"] for e in data["audit"]}
    assert "lookup.careteam" in actions and all(e.get("nhsNumber") in (CHILD_A, None) for e in data["audit"])
    assert "ev-2" not in orjson.dumps(data).decode()

    system = [orjson.loads(x) for x in await redis.lrange(keys.system_audit, 0, -1)]
    [exported] = [e for e in system if e["action"] == "subject-access.export"]
    assert exported["detail"]["subjectTag"] == keys.tag(CHILD_A) and exported["nhsNumber"] is None
    assert CHILD_A not in orjson.dumps(exported).decode()
    # The next export finds the first one in the system audit.
    async with open_services(settings) as opened:
        service = opened.retention
        data = await service.export(OPS_CTX, NhsNumber(CHILD_A))
    assert [e["action"] for e in data["systemAudit"]] == ["subject-access.export"]


def run_cli(args, env, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "cpis_bridge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_cli_purge_and_export_on_external_redis(app, settings, redis_url, key_prefix, tmp_path):
    await app[SERVICES].records.put(
        ctx(Role.LOCAL_AUTHORITY, "LA001"),
        "LA001",
        "OLD-1",
        record("OLD-1", CHILD_A, startDate="2019-01-01", endDate="2020-01-02"),
    )
    await app[SERVICES].records.put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "NEW-1", record("NEW-1", CHILD_B))
    env = {
        **os.environ,
        "CPIS_REDIS_URL": redis_url,
        "CPIS_KEY_PREFIX": key_prefix,
        "CPIS_LOG_HASH_KEY": HASH_KEY,
        "CPIS_DATA_DIR": str(tmp_path / "cli"),
        "CPIS_REGISTRY": str(settings.registry),
    }
    done = run_cli(["purge", "--actor", "night-job"], env)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["removed"]["records"] == 1
    out = tmp_path / "export.json"
    done = run_cli(["export", "--nhs-number", CHILD_B, "--output", str(out)], env)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600 and CHILD_B not in done.stdout
    data = orjson.loads(out.read_text())
    assert [r["localId"] for r in data["records"]["LA001"]] == ["NEW-1"]
    assert CHILD_B not in done.stderr
    system = [orjson.loads(x) for x in await app[REDIS].lrange(app[KEYS].system_audit, 0, -1)]
    assert [e["action"] for e in system] == ["subject-access.export", "retention.purge"]
    assert system[1]["actor"] == "cli:night-job"
    bad = run_cli(["export", "--nhs-number", "123"], env)
    assert bad.returncode == 2 and "123" not in bad.stderr


def test_cli_starts_embedded_redis_only_when_none_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPIS_")}
    env.update({"CPIS_DATA_DIR": str(tmp_path / "var"), "CPIS_LOG_HASH_KEY": HASH_KEY})
    done = run_cli(["purge"], env)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["removed"] == {"records": 0, "accesses": 0, "inboxEntries": 0, "auditEntries": 0}
    assert (tmp_path / "var" / "cpis.aof").exists() or (tmp_path / "var" / "appendonlydir").exists()
    assert not socket_answers(tmp_path / "var" / "redis.sock")  # the one it started is stopped again


def test_cli_uses_the_running_embedded_redis_and_leaves_it_running(tmp_path):
    import redis as redis_sync

    from cpis_bridge.store.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "var")
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CPIS_")}
        env.update({"CPIS_DATA_DIR": str(tmp_path / "var"), "CPIS_LOG_HASH_KEY": HASH_KEY})
        done = run_cli(["purge", "--actor", "ops-person"], env)
        assert done.returncode == 0, done.stderr
        assert server.running and socket_answers(server.socket_path)
        client = redis_sync.Redis.from_url(server.url, decode_responses=True)
        try:
            [entry] = [orjson.loads(x) for x in client.lrange("cpis:audit:sys", 0, -1)]
        finally:
            client.close()
        assert entry["action"] == "retention.purge" and entry["actor"] == "cli:ops-person"
    finally:
        server.stop()


async def test_a_record_changed_after_the_scan_is_not_purged(app, settings):
    """The Lua step deletes only the version the scan saw: a correction in between wins."""
    from cpis_bridge.store.retention import RedisRetentionStore
    from cpis_bridge.store.scripts import Scripts

    redis, keys, records = app[REDIS], app[KEYS], app[SERVICES].records
    la = ctx(Role.LOCAL_AUTHORITY, "LA001")
    await records.put(la, "LA001", "OLD-1", record("OLD-1", CHILD_A, startDate="2019-01-01", endDate="2020-01-02"))
    store = RedisRetentionStore(redis, keys, Scripts(redis))
    scanned = [r async for batch in store.child_records() for r in batch]
    assert [r.local_id for r in scanned] == ["OLD-1"]
    await records.put(la, "LA001", "OLD-1", record("OLD-1", CHILD_A, startDate="2019-01-01", endDate="2020-01-03"))
    assert await store.delete_records(scanned, {"action": "record.purged"}) == 0
    assert await redis.hget(keys.la_ids("LA001"), "OLD-1") == CHILD_A
    rescanned = [r async for batch in store.child_records() for r in batch]
    assert await store.delete_records(rescanned, {"action": "record.purged"}) == 1
    assert await redis.hlen(keys.records(keys.tag(CHILD_A))) == 0


async def test_purge_of_accesses_trims_the_old_tail_and_any_old_entry_out_of_order(app, settings):
    redis, keys = app[REDIS], app[KEYS]
    la = ctx(Role.LOCAL_AUTHORITY, "LA001")
    await app[SERVICES].records.put(la, "LA001", "NEW-1", record("NEW-1", CHILD_B, startDate="2019-01-01"))
    await app[SERVICES].records.put(la, "LA001", "NEW-2", record("NEW-2", CHILD_A, startDate="2019-01-01"))
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(days=800)
    # CHILD_B: two old at the tail, one old between new ones (a process whose clock was behind); CHILD_A: all old.
    for event, at in (("o1", old), ("o2", old), ("n1", now), ("o3", old), ("n2", now)):
        await lookup(app, CHILD_B, event, clock=lambda at=at: at)
    for event in ("a1", "a2"):
        await lookup(app, CHILD_A, event, clock=lambda: old)
    async with open_services(settings) as opened:
        service = opened.retention
        counts = await service.purge(OPS_CTX)
    assert counts["accesses"] == 5
    history = await redis.lrange(keys.accesses(keys.tag(CHILD_B)), 0, -1)
    assert [h.split("\x1f")[1] for h in history] == ["n2", "n1"]
    assert not await redis.exists(keys.accesses(keys.tag(CHILD_A)))
