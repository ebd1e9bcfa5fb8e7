"""Fast service tests on the in-memory fakes of the core ports (tests/support/fakes.py, held to the Redis adapters'
behaviour by tests/integration/test_port_contracts.py): access decisions (unscheduled or silent, visibility by the
injected clock's day, one notification per LA) and record writes (created, unchanged, erased, audited)."""

from __future__ import annotations

import datetime as dt

import pytest

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.errors import NotFound, ValidationFailed
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.core.records import VisibilityWindows
from cpis_bridge.core.registry import CareSetting
from cpis_bridge.services.access import AccessService, LookupRequest
from cpis_bridge.services.records import RecordService
from tests.support.clock import ManualClock
from tests.support.fakes import FakeAccessStore, FakeAuditLog, FakeRecordStore, Memory
from tests.support.world import record

CHILD = "9990000018"
ED = CareSetting("RXX01", "Example Hospital Emergency Department", "ED", unscheduled=True)
GP = CareSetting("GP001", "Example Surgery", "GP", unscheduled=False)
LA_CTX = {la: AuditContext(Principal(f"u-{la}", Role.LOCAL_AUTHORITY, la)) for la in ("LA001", "LA002")}
ED_CTX = AuditContext(Principal("u-ed", Role.CARE_SETTING, "RXX01", name="Dr Test Example", role_code="R8000"))
GP_CTX = AuditContext(Principal("u-gp", Role.CARE_SETTING, "GP001"))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC))


@pytest.fixture
def memory(clock: ManualClock) -> Memory:
    return Memory(clock=clock)


@pytest.fixture
def records(memory: Memory, clock: ManualClock) -> RecordService:
    return RecordService(
        FakeRecordStore(memory), FakeAuditLog(memory), windows=VisibilityWindows(), test_numbers_only=True, clock=clock
    )


@pytest.fixture
def notified() -> list[int]:
    return []


@pytest.fixture
def access(memory: Memory, clock: ManualClock, notified: list[int]) -> AccessService:
    return AccessService(FakeAccessStore(memory), windows=VisibilityWindows(), clock=clock, on_notified=notified.append)


def req(setting: CareSetting = ED, event: str = "ev-1", **kw: object) -> LookupRequest:
    return LookupRequest(nhs=NhsNumber(CHILD), care_setting=setting, kind="careteam", source_event_id=event, **kw)


async def test_put_creates_then_an_identical_put_changes_nothing(records: RecordService, memory: Memory) -> None:
    stored, created = await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD))
    assert created and stored.version == 1
    again, created = await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD))
    assert not created and again.version == 1
    changed, created = await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD, endDate="2026-03-01"))
    assert not created and changed.version == 2 and changed.end_date == dt.date(2026, 3, 1)
    assert [e["action"] for e in memory.audit[CHILD]] == ["record.put", "record.put"]


async def test_erase_then_read_is_not_found_and_a_bad_number_is_a_validation_error(records: RecordService) -> None:
    await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD))
    await records.erase(LA_CTX["LA001"], "LA001", "A-1")
    with pytest.raises(NotFound):
        await records.get(LA_CTX["LA001"], "LA001", "A-1")
    with pytest.raises(NotFound):
        await records.erase(LA_CTX["LA001"], "LA001", "A-1")
    with pytest.raises(ValidationFailed):
        await records.list_for_number(LA_CTX["LA001"], "LA001", "12345")


async def test_listing_a_child_with_nothing_audits_without_the_number(records: RecordService, memory: Memory) -> None:
    assert await records.list_for_number(LA_CTX["LA001"], "LA001", CHILD) == []
    [entry] = memory.audit[CHILD]
    assert entry["action"] == "record.list" and entry["nhsNumber"] is None and entry["detail"] == {"count": 0}


async def test_a_scheduled_setting_looks_silently(
    records: RecordService, access: AccessService, memory: Memory, notified: list[int]
) -> None:
    await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD))
    out = await access.lookup(GP_CTX, req(GP))
    assert out.status == 0 and [r.local_id for r in out.records] == ["A-1"]
    claimed_not = await access.lookup(ED_CTX, req(unscheduled_claimed=False))
    assert claimed_not.status == 0
    assert memory.notifications == [] and notified == []
    assert [e["action"] for e in memory.audit[CHILD][:2]] == ["lookup.careteam.silent"] * 2


async def test_an_unscheduled_access_notifies_each_la_once_per_source_event(
    records: RecordService, access: AccessService, memory: Memory, notified: list[int]
) -> None:
    await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD))
    await records.put(LA_CTX["LA002"], "LA002", "B-1", record("B-1", CHILD))
    out = await access.lookup(ED_CTX, req(event="ev-1"))
    assert out.status == 1 and out.access is not None and out.access.actor.user_name == "Dr Test Example"
    assert sorted(la for la, _ in memory.notifications) == ["LA001", "LA002"] and notified == [2]
    repeat = await access.lookup(ED_CTX, req(event="ev-1"))
    assert repeat.status == 2 and repeat.access_id == out.access_id
    assert len(memory.notifications) == 2 and notified == [2]
    assert memory.audit[CHILD][0]["action"] == "lookup.careteam" and memory.audit[CHILD][0]["nhsNumber"] == CHILD


async def test_visibility_follows_the_clock_across_the_window(
    records: RecordService, access: AccessService, clock: ManualClock, memory: Memory
) -> None:
    """An ended CPP stays visible for 364 days after its end date (docs/domain.md), then the look-up finds nothing
    and its audit entry carries no number; the service's day comes from the injected clock."""
    await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD, endDate="2026-03-01"))
    clock.now = dt.datetime(2027, 2, 28, 12, 0, tzinfo=dt.UTC)  # the 364th day after the end
    assert (await access.lookup(ED_CTX, req(event="ev-1"))).status == 1
    clock.advance(days=1)
    out = await access.lookup(ED_CTX, req(event="ev-2"))
    assert out.status == 0 and out.records == []
    assert memory.audit[CHILD][0]["nhsNumber"] is None
    assert await access.history(NhsNumber(CHILD)) == ([], [])


async def test_an_encounter_is_shown_only_to_the_care_setting_that_sent_it(
    records: RecordService, access: AccessService
) -> None:
    await records.put(LA_CTX["LA001"], "LA001", "A-1", record("A-1", CHILD))
    encounter = {
        "resourceType": "Encounter",
        "serviceProvider": {"identifier": {"value": "RXX01"}},
        "subject": {"identifier": {"value": CHILD}},
    }
    out = await access.lookup(ED_CTX, req(encounter=encounter))
    assert out.access_id is not None
    assert await access.encounter(out.access_id, ctx=ED_CTX) == encounter
    other = AuditContext(Principal("u-x", Role.CARE_SETTING, "RXX02"))
    assert await access.encounter(out.access_id, ctx=other) is None
