"""The access step against real Redis: visibility, idempotency, one notification per owning LA, 25-entry history."""

import datetime as dt

import orjson
import pytest

from cpis_bridge.app import create_app
from cpis_bridge.core.access import notification_id
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.web.state import ACCESS, KEYS, RECORDS, REDIS, REGISTRY
from tests.conftest import record

pytestmark = pytest.mark.no_relays


@pytest.fixture
async def app(aiohttp_client, make_settings):
    # relays off: these tests inspect the delivery queue, which running relays would drain
    c = await aiohttp_client(create_app(make_settings(relays=False)))
    return c.app


def ctx(role: Role, ods: str) -> AuditContext:
    return AuditContext(Principal(subject=f"u-{ods}", role=role, ods=ods, name="Test User", role_code="R0001"))


async def test_two_las_one_notification_each_with_own_records(app):
    nhs = NhsNumber("9990000018")
    records = app[RECORDS]
    await records.put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-1", record("A-1"))
    await records.put(ctx(Role.LOCAL_AUTHORITY, "LA002"), "LA002", "B-1", record("B-1", planType="LAC"))
    ed = app[REGISTRY].care_settings["RXX01"]
    out = await app[ACCESS].lookup(ctx(Role.CARE_SETTING, "RXX01"),
                                   LookupRequest(nhs=nhs, care_setting=ed, kind="careteam", source_event_id="t-1"))
    assert out.status == 1 and len(out.records) == 2
    again = await app[ACCESS].lookup(ctx(Role.CARE_SETTING, "RXX01"),
                                     LookupRequest(nhs=nhs, care_setting=ed, kind="careteam", source_event_id="t-1"))
    assert again.status == 2 and again.access_id == out.access_id
    redis, keys = app[REDIS], app[KEYS]
    assert await redis.xlen(keys.notify_queue) == 0  # neither LA has a push channel: nothing for the relays
    for la, lid in (("LA001", "A-1"), ("LA002", "B-1")):
        [(eid, fields)] = await redis.xrange(keys.inbox(la))
        assert [r["localId"] for r in orjson.loads(fields["recs"])] == [lid]
        assert await redis.hgetall(keys.inbox_index(la)) == {notification_id(out.access_id, la): eid}


async def test_silent_and_unflagged_record_nothing(app):
    gp = app[REGISTRY].care_settings["GP001"]
    await app[RECORDS].put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-1", record("A-1"))
    out = await app[ACCESS].lookup(ctx(Role.CARE_SETTING, "GP001"),
                                   LookupRequest(nhs=NhsNumber("9990000018"), care_setting=gp, kind="careteam"))
    assert out.status == 0 and len(out.records) == 1
    ed = app[REGISTRY].care_settings["RXX01"]
    out = await app[ACCESS].lookup(ctx(Role.CARE_SETTING, "RXX01"),
                                   LookupRequest(nhs=NhsNumber("9990000026"), care_setting=ed, kind="careteam"))
    assert out.status == 0 and out.records == []
    redis, keys = app[REDIS], app[KEYS]
    assert await redis.xlen(keys.notify_queue) == 0
    assert await redis.llen(keys.accesses(keys.tag("9990000026"))) == 0
    [entry] = await redis.lrange(keys.audit(keys.tag("9990000026")), 0, -1)
    assert orjson.loads(entry)["nhsNumber"] is None


async def test_history_keeps_newest_25(app):
    await app[RECORDS].put(ctx(Role.LOCAL_AUTHORITY, "LA001"), "LA001", "A-1", record("A-1"))
    ed = app[REGISTRY].care_settings["RXX01"]
    for i in range(30):
        await app[ACCESS].lookup(ctx(Role.CARE_SETTING, "RXX01"),
                                 LookupRequest(nhs=NhsNumber("9990000018"), care_setting=ed, kind="careteam",
                                               source_event_id=f"e{i}"))
    visible, history = await app[ACCESS].history(NhsNumber("9990000018"))
    assert [a.source_event_id for _, a in history] == [f"e{i}" for i in range(29, 4, -1)]
    assert visible and all(isinstance(a.occurred_at, dt.datetime) for _, a in history)
