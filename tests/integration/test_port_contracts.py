"""Contract tests of the core ports: each test body runs against the in-memory fakes (tests/support/fakes.py) AND
the Redis adapters (store/), so the fakes the fast service tests use behave as the real stores do."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from cpis_bridge.core.access import Access, Actor
from cpis_bridge.core.clock import EPOCH
from cpis_bridge.core.errors import UploadInterrupted
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import AccessStore, AuditLog, Change, RecordStore, UploadStore
from cpis_bridge.core.records import PlanType, Record, VisibilityWindows
from cpis_bridge.store.accesses import RedisAccessStore
from cpis_bridge.store.audit import RedisAuditLog
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.records import RedisRecordStore
from cpis_bridge.store.scripts import Scripts
from cpis_bridge.store.uploads import RedisUploadStore
from tests.support.fakes import FakeAccessStore, FakeAuditLog, FakeRecordStore, FakeUploadStore, Memory
from tests.support.polling import wait_for_async
from tests.support.world import HASH_KEY

WINDOWS = VisibilityWindows()
TODAY = dt.date(2026, 3, 2)
CHILD, OTHER = "9990000018", "9990000026"


@dataclass
class Ports:
    """One implementation of each port over one shared state, with what a test needs to look behind them."""

    records: RecordStore
    audit: AuditLog
    access: AccessStore
    uploads: UploadStore
    notified: Callable[[str], Awaitable[int]]  # how many notifications an LA's inbox holds
    expire_lease: Callable[[str], Awaitable[None]]  # let the LA's upload lease run out


@pytest.fixture(params=["memory", "redis"])
async def ports(request: pytest.FixtureRequest) -> AsyncIterator[Ports]:
    if request.param == "memory":
        m = Memory()

        async def notified(la: str) -> int:
            return sum(1 for n_la, _ in m.notifications if n_la == la)

        async def expire_memory(la: str) -> None:
            m.now_s += 3600

        yield Ports(
            FakeRecordStore(m), FakeAuditLog(m), FakeAccessStore(m), FakeUploadStore(m), notified, expire_memory
        )
        return
    redis_url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("key_prefix")
    client = Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(prefix, HASH_KEY.encode())
    scripts = Scripts(client)
    access = RedisAccessStore(client, keys, scripts, encounter_ttl_s=3600, push_las=("LA001",))

    async def inbox_length(la: str) -> int:
        return int(await client.xlen(keys.inbox(la)))

    async def expire_redis(la: str) -> None:
        await client.pexpire(keys.la_lock(la), 1)
        await wait_for_async(lambda: _gone(client, keys.la_lock(la)), timeout=5, what="the lease did not expire")

    try:
        yield Ports(
            RedisRecordStore(client, keys, scripts, sync_enabled=False),
            RedisAuditLog(client, keys),
            access,
            RedisUploadStore(client, keys),
            inbox_length,
            expire_redis,
        )
    finally:
        await access.aclose()
        await client.aclose()


async def _gone(client: Redis, key: str) -> bool:
    return not await client.exists(key)


def rec(lid: str = "A-1", nhs: str = CHILD, la: str = "LA001", **kw: Any) -> Record:
    values: dict[str, Any] = {
        "plan_type": PlanType.CPP,
        "date_of_birth": dt.date(2016, 4, 2),
        "start_date": dt.date(2026, 1, 10),
        "given_name": "Testchild",
        "family_name": "Example",
    }
    values.update(kw)
    return Record(la=la, local_id=lid, nhs_number=NhsNumber(nhs), **values)


def change(record: Record, action: str = "record.put") -> Change:
    last = record.last_visible_day(WINDOWS)
    day = None if last is None else (last - EPOCH).days + 1
    return Change(record, day, {"action": action, "nhsNumber": str(record.nhs_number), "la": record.la})


def access(event: str = "ev-1", cs: str = "RXX01") -> Access:
    at = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)
    return Access(cs, event, at, Actor("u-1", "Dr Test Example", "R8000"))


async def lookup(ports: Ports, a: Access | None, nhs: str = CHILD, day: dt.date = TODAY, **kw: Any) -> Any:
    return await ports.access.lookup(
        nhs,
        today_day=(day - EPOCH).days,
        windows=WINDOWS,
        record_access=a,
        audit_with={"action": "lookup", "nhsNumber": nhs},
        audit_without={"action": "lookup", "nhsNumber": None},
        **kw,
    )


# -- RecordStore ------------------------------------------------------------------------------------------------


async def test_apply_creates_modifies_and_leaves_an_identical_record_alone(ports: Ports) -> None:
    assert await ports.records.apply("LA001", [change(rec())]) == [("C", 1)]
    stored = await ports.records.get("LA001", "A-1")
    assert stored is not None and stored.version == 1 and stored.updated_at is not None
    assert stored.given_name == "Testchild" and stored.start_date == dt.date(2026, 1, 10)
    assert await ports.records.apply("LA001", [change(rec())]) == [("U", 1)]
    assert len(await ports.audit.query(CHILD)) == 1, "an unchanged record writes no audit entry"
    assert await ports.records.apply("LA001", [change(rec(end_date=dt.date(2026, 2, 1)))]) == [("M", 2)]
    stored = await ports.records.get("LA001", "A-1")
    assert stored is not None and stored.version == 2 and stored.end_date == dt.date(2026, 2, 1)
    assert [e["action"] for e in await ports.audit.query(CHILD)] == ["record.put", "record.put"]


async def test_index_count_for_number_and_get_many(ports: Ports) -> None:
    await ports.records.apply("LA001", [change(rec("A-1")), change(rec("A-2", OTHER))])
    await ports.records.apply("LA002", [change(rec("B-1", la="LA002"))])
    assert await ports.records.index("LA001") == {"A-1": CHILD, "A-2": OTHER}
    assert await ports.records.count("LA001") == 2 and await ports.records.count("LA003") == 0
    assert [r.local_id for r in await ports.records.for_number("LA001", CHILD)] == ["A-1"]
    assert [r.local_id for r in await ports.records.for_number("LA002", CHILD)] == ["B-1"]
    many = await ports.records.get_many("LA001", ["A-2", "missing", "A-1"])
    assert [None if r is None else r.local_id for r in many] == ["A-2", None, "A-1"]
    assert await ports.records.get_many("LA001", []) == []


async def test_a_record_moved_to_another_number_leaves_the_first_child(ports: Ports) -> None:
    await ports.records.apply("LA001", [change(rec("A-1", CHILD))])
    assert await ports.records.apply("LA001", [change(rec("A-1", OTHER))]) == [("M", 2)]
    assert await ports.records.for_number("LA001", CHILD) == []
    assert [r.local_id for r in await ports.records.for_number("LA001", OTHER)] == ["A-1"]
    assert await ports.records.index("LA001") == {"A-1": OTHER}


async def test_erase_removes_the_record_once_and_audits_it(ports: Ports) -> None:
    await ports.records.apply("LA001", [change(rec())])
    assert await ports.records.erase("LA001", "A-1", lambda nhs: {"action": "record.erase", "nhsNumber": nhs}) is True
    assert await ports.records.get("LA001", "A-1") is None
    assert await ports.records.count("LA001") == 0
    assert await ports.records.erase("LA001", "A-1", lambda nhs: {"action": "record.erase"}) is False
    assert [e["action"] for e in await ports.audit.query(CHILD)] == ["record.erase", "record.put"]
    assert (await ports.audit.query(CHILD))[0]["nhsNumber"] == CHILD  # audit(nhs) got the number the index held


async def test_put_answers_the_record_as_stored(ports: Ports) -> None:
    code, first = await ports.records.put("LA001", change(rec()))
    assert code == "C" and first == await ports.records.get("LA001", "A-1")
    assert first.version == 1 and first.updated_at is not None and first.given_name == "Testchild"
    code, same = await ports.records.put("LA001", change(rec()))
    assert code == "U" and same == first, "an unchanged record is answered as it was stored (its old update time)"
    code, moved = await ports.records.put("LA001", change(rec(nhs=OTHER, end_date=dt.date(2026, 2, 1))))
    assert code == "M" and moved == await ports.records.get("LA001", "A-1")
    assert moved.version == 2 and moved.nhs_number == OTHER and moved.end_date == dt.date(2026, 2, 1)


async def test_get_indexed_reads_the_records_the_index_names(ports: Ports) -> None:
    await ports.records.apply("LA001", [change(rec("A-1")), change(rec("A-2", OTHER)), change(rec("A-3"))])
    entries = sorted((await ports.records.index("LA001")).items())
    await ports.records.apply("LA001", [change(rec("A-3", OTHER))])  # moves after the index was read
    await ports.records.erase("LA001", "A-2", lambda nhs: {"action": "record.erase"})  # goes after it
    got = await ports.records.get_indexed("LA001", entries)
    assert got == await ports.records.get_many("LA001", [lid for lid, _ in entries])
    assert [None if r is None else (r.local_id, str(r.nhs_number)) for r in got] == [
        ("A-1", CHILD),
        None,
        ("A-3", OTHER),
    ]
    assert await ports.records.get_indexed("LA001", []) == []


async def test_apply_under_a_lease_writes_only_while_the_lease_is_held(ports: Ports) -> None:
    assert await ports.uploads.acquire("LA001", "tok-1", 60_000) is None
    assert await ports.records.apply("LA001", [change(rec())], lease="tok-1") == [("C", 1)]
    with pytest.raises(UploadInterrupted):
        await ports.records.apply("LA001", [change(rec("A-2"))], lease="tok-2")
    assert await ports.records.get("LA001", "A-2") is None


# -- AuditLog ---------------------------------------------------------------------------------------------------


async def test_audit_is_per_child_newest_first_with_a_limit(ports: Ports) -> None:
    for i in range(3):
        await ports.audit.append(CHILD, {"action": f"a{i}", "n": i})
    await ports.audit.append(None, {"action": "system"})
    await ports.audit.append(OTHER, {"action": "other"})
    assert [e["action"] for e in await ports.audit.query(CHILD)] == ["a2", "a1", "a0"]
    assert [e["n"] for e in await ports.audit.query(CHILD, limit=2)] == [2, 1]
    assert [e["action"] for e in await ports.audit.query(OTHER)] == ["other"]


# -- AccessStore ------------------------------------------------------------------------------------------------


async def test_a_child_without_a_visible_record_records_nothing_and_audits_without_the_number(ports: Ports) -> None:
    out = await lookup(ports, access())
    assert (out.status, out.records, out.access, out.access_id) == (0, [], None, None)
    await ports.records.apply("LA001", [change(rec(end_date=dt.date(2025, 1, 1)))])  # ended beyond the window
    out = await lookup(ports, access())
    assert out.status == 0 and out.records == []
    assert await ports.notified("LA001") == 0
    entries = await ports.audit.query(CHILD)
    assert entries[0] == {"action": "lookup", "nhsNumber": None}


async def test_an_access_is_recorded_once_per_source_event_and_notifies_each_la(ports: Ports) -> None:
    await ports.records.apply("LA001", [change(rec("A-1"))])
    await ports.records.apply("LA002", [change(rec("B-1", la="LA002", start_date=dt.date(2026, 3, 3)))])  # not yet
    first = await lookup(ports, access("ev-1"))
    assert first.status == 1 and first.access == access("ev-1") and first.access_id
    assert [r.local_id for r in first.records] == ["A-1"]
    again = await lookup(ports, access("ev-1"))
    assert again.status == 2 and again.access_id == first.access_id and again.access == access("ev-1")
    other = await lookup(ports, access("ev-2"))
    assert other.status == 1 and other.access_id != first.access_id
    assert await ports.notified("LA001") == 2 and await ports.notified("LA002") == 0
    # the next day LA002's record is visible too: one notification for each LA
    later = await lookup(ports, access("ev-3"), day=TODAY + dt.timedelta(days=1))
    assert later.status == 1 and {r.la for r in later.records} == {"LA001", "LA002"}
    assert await ports.notified("LA001") == 3 and await ports.notified("LA002") == 1
    assert (await ports.audit.query(CHILD))[0] == {"action": "lookup", "nhsNumber": CHILD}


async def test_a_silent_lookup_records_nothing_and_history_lists_accesses_newest_first(ports: Ports) -> None:
    await ports.records.apply("LA001", [change(rec())])
    silent = await lookup(ports, None)
    assert silent.status == 0 and [r.local_id for r in silent.records] == ["A-1"] and silent.access is None
    await lookup(ports, access("ev-1"))
    out = await lookup(ports, access("ev-2"), recent=True)
    assert [a.source_event_id for a in out.recent] == ["ev-2", "ev-1"]
    records, accesses = await ports.access.history(CHILD)
    assert [r.local_id for r in records] == ["A-1"]
    assert [a.source_event_id for _, a in accesses] == ["ev-2", "ev-1"]
    assert accesses[0][0] == out.access_id


async def test_an_encounter_is_kept_under_its_access_id(ports: Ports) -> None:
    await ports.records.apply("LA001", [change(rec())])
    encounter = {"resourceType": "Encounter", "status": "arrived"}
    out = await lookup(ports, access(), encounter=encounter)
    assert await ports.access.encounter(out.access_id) == encounter
    assert await ports.access.encounter(str(uuid.uuid4())) is None
    await ports.access.keep_practitioner_roles({"pr-1": b'{"resourceType": "PractitionerRole"}'})
    assert await ports.access.practitioner_role("pr-1") == {"resourceType": "PractitionerRole"}
    assert await ports.access.practitioner_role("pr-2") is None


# -- UploadStore ------------------------------------------------------------------------------------------------


async def test_the_upload_lease_is_exclusive_until_released_or_expired(ports: Ports) -> None:
    up = ports.uploads
    assert await up.acquire("LA001", "tok-1", 60_000) is None
    assert await up.acquire("LA001", "tok-2", 60_000) == "tok-1"
    assert await up.acquire("LA002", "tok-2", 60_000) is None  # per LA
    assert await up.renew("LA001", "tok-1", 60_000) is True
    assert await up.renew("LA001", "tok-2", 60_000) is False
    await up.release("LA001", "tok-2")  # not the holder: no effect
    assert await up.acquire("LA001", "tok-3", 60_000) == "tok-1"
    await up.release("LA001", "tok-1")
    assert await up.acquire("LA001", "tok-3", 60_000) is None
    await ports.expire_lease("LA001")
    assert await up.renew("LA001", "tok-3", 60_000) is False
    assert await up.acquire("LA001", "tok-4", 60_000) is None


async def test_the_journal_is_kept_until_finish_and_only_the_holder_writes(ports: Ports) -> None:
    up = ports.uploads
    assert await up.acquire("LA001", "tok-1", 60_000) is None
    assert await up.push_body("LA001", "tok-2", b"x", first=True) is False
    assert await up.push_body("LA001", "tok-1", b'{"a": 1}\n', first=True) is True
    assert await up.push_body("LA001", "tok-1", b'{"b": "\xc3', first=False) is True  # may end inside a character
    assert await up.commit("LA001", "tok-2", b"entry") is False
    assert await up.journal("LA001") is None
    assert await up.commit("LA001", "tok-1", b'{"sequence": 4}') is True
    assert await up.journal("LA001") == b'{"sequence": 4}'
    assert await up.journalled(["LA001", "LA002"]) == ["LA001"]
    assert [c async for c in up.read_body("LA001")] == [b'{"a": 1}\n', b'{"b": "\xc3']
    assert await up.finish("LA001", "tok-2", 4, b"report") is False
    assert await up.finish("LA001", "tok-1", 4, b'{"accepted": 1}') is True
    assert await up.journal("LA001") is None and await up.journalled(["LA001"]) == []
    assert await up.upload_report("LA001", 4) == b'{"accepted": 1}'
    assert await up.last_sequence("LA001") == 4
    assert await up.finish("LA001", "tok-1", 3, b"{}") is True  # an older sequence never lowers the last
    assert await up.last_sequence("LA001") == 4
    assert await up.finish("LA001", "tok-1", 9, None) is True  # no report: the sequence is not used up
    assert await up.last_sequence("LA001") == 4 and await up.upload_report("LA001", 9) is None
    assert await up.last_sequence("LA002") is None
