"""Flag sync against a real aiohttp FHIR server double that misbehaves on purpose, with real Redis: the server
ends equal to the store, only newest versions are sent, throttling pauses every request, failures dead-letter."""

from __future__ import annotations

import datetime as dt
import logging
import uuid

import orjson
import pytest
from fhir.resources.R4B.flag import Flag

from cpis_bridge.fhir.flag_sync import FLAG_NAMESPACE, IDENTIFIER_SYSTEM, flag_id
from tests.support.fhir_double import Fault, FhirDouble, outcome
from tests.support.sync import make_env
from tests.support.world import record

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def env(aiohttp_client, make_settings, double):
    settings = make_settings(fhir_base_url=double.base_url, relays=False)
    e = await make_env(aiohttp_client, settings, timeout_s=2.0)
    yield e
    await e.session.close()


def puts(double: FhirDouble) -> list[tuple[float, str, str, int]]:
    return [r for r in double.requests if r[2] != "metadata"]


async def test_backlog_goes_as_batches_and_server_equals_store(env, double):
    numbers = ["9990000018", "9990000026", "9990000034"]
    for i in range(30):
        await env.put(
            f"C-{i}",
            record(
                f"C-{i}",
                nhs=numbers[i % 3],
                startDate="2025-01-10",
                endDate="2025-02-01" if i % 5 == 0 else None,
                planType=("CPP", "LAC")[i % 2],
            ),
        )
    await env.put("U-1", record("U-1", planType="UCPP", startDate="2026-01-10", endDate="2026-02-01"))
    await env.put("GONE", record("GONE"))
    await env.erase("GONE")
    await env.drain()
    expected = await env.expected()
    state = double.state()
    gone = state.pop("LA001|GONE")
    assert state == expected
    assert gone[0] == "entered-in-error"
    assert sum(1 for s in expected.values() if s[0] == "inactive") == 7  # 6 ended 2025-02-01, the UCPP 2026-02-01
    assert any(r[2] == "" and r[1] == "POST" for r in double.requests), "a backlog goes as batch Bundles"
    # ids are UUIDv5 of (LA, localId) under the documented namespace; the Flag is valid R4 (fhir.resources R4B)
    fid = str(uuid.uuid5(FLAG_NAMESPACE, "LA001|U-1"))
    flag = double.flags[fid]
    Flag.model_validate(flag)
    assert flag["identifier"] == [{"system": IDENTIFIER_SYSTEM, "value": "LA001|U-1"}]
    assert flag["subject"]["identifier"] == {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}
    assert flag["author"]["identifier"]["value"] == "LA001"
    assert flag["period"] == {"start": "2026-01-10", "end": "2026-02-01"}
    assert flag["meta"]["profile"] == ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Flag"]
    codes = {c["code"] for c in flag["code"]["coding"]}
    assert codes == {"818901000000100", "UCPP"}
    assert [c["coding"][0]["code"] for c in flag["category"]] == ["safety", "CP-IS"]
    assert await env.dead() == []


async def test_only_the_newest_version_is_sent(env, double):
    await env.put("V", record("V"))
    await env.put("V", record("V", endDate="2026-02-01"))
    await env.put("V", record("V", endDate="2026-03-01"))
    await env.drain()
    writes = [r for r in puts(double) if r[1] == "PUT"]
    assert len(writes) == 1
    assert double.flags[flag_id("LA001", "V")]["period"]["end"] == "2026-03-01"


async def test_200_instead_of_201_is_success(env, double):
    double.always_200 = True
    await env.put("A", record("A"))
    await env.drain()
    assert double.state() == await env.expected()
    assert await env.dead() == []


async def test_429_with_retry_after_pauses_every_request(env, double):
    double.faults.append(Fault(429, {"Retry-After": "1"}, outcome("throttled", "slow down")))
    await env.put("R-0", record("R-0"))
    await env.parts.relay.run_once()  # answered 429: the whole server is paused
    for i in range(1, 8):
        await env.put(f"R-{i}", record(f"R-{i}"))
    await env.drain()
    assert double.state() == await env.expected()
    i429 = next(i for i, r in enumerate(double.requests) if r[3] == 429)
    answered = double.answered[i429]
    later = [r[0] for r in double.requests if r[0] > answered]
    assert later and min(later) - answered >= 0.95, "no request before Retry-After has passed"


async def test_503_without_retry_after_backs_off_then_succeeds(env, double):
    for _ in range(3):
        double.faults.append(Fault(503, {}, outcome("transient", "down")))
    await env.put("B", record("B"))
    await env.drain()
    assert double.state() == await env.expected()
    statuses = [s for *_x, s in puts(double)]
    assert statuses[:3] == [503, 503, 503] and statuses[-1] in (200, 201)
    times = [t for t, *_x in puts(double)]
    # settings: first retry 0.05 s, doubling, full jitter over the upper half
    assert times[1] - times[0] >= 0.024 and times[3] - times[2] >= 0.099


async def test_ratelimit_reset_is_used_without_retry_after(env, double):
    double.faults.append(Fault(429, {"ratelimit": '"default";r=0;t=1'}, outcome("throttled", "quota")))
    await env.put("Q", record("Q"))
    await env.drain()
    seen = puts(double)
    assert seen[1][0] - seen[0][0] >= 0.95
    assert double.state() == await env.expected()


async def test_timeouts_are_retried(env, double):
    import aiohttp

    env.parts.server.client.timeout = aiohttp.ClientTimeout(total=0.3)
    for _ in range(4):
        double.faults.append(Fault(200, delay_s=1.0))
    await env.put("T", record("T"))
    await env.drain(timeout_s=40)
    assert double.state() == await env.expected()


async def test_400_and_422_dead_letter_with_operation_outcome(env, double):
    double.reject["LA001|BAD1"] = (422, outcome("invalid", "Flag.code not in value set"))
    double.reject["LA001|BAD2"] = (400, outcome("structure", "bad resource"))
    await env.put("BAD1", record("BAD1"))
    await env.put("BAD2", record("BAD2"))
    await env.put("GOOD", record("GOOD"))
    await env.drain()
    dead = {d["lid"]: d for d in await env.dead()}
    assert set(dead) == {"BAD1", "BAD2"}
    assert dead["BAD1"]["channel"] == "flag-sync" and dead["BAD1"]["la"] == "LA001"
    assert orjson.loads(dead["BAD1"]["outcome"])["issue"][0]["diagnostics"] == "Flag.code not in value set"
    assert dead["BAD2"]["status"] == "400"
    assert set(double.state()) == {"LA001|GOOD"}


async def test_version_conflict_412_is_reread_and_retried(env, double):
    double.faults.append(Fault(412, {}, outcome("conflict", "version mismatch")))
    double.faults.append(Fault(409, {}, outcome("conflict", "busy")))
    await env.put("C", record("C"))
    await env.drain()
    assert double.state() == await env.expected()
    assert await env.dead() == []


async def test_412_multiple_matches_is_dead_at_once(aiohttp_client, make_settings, double):
    """Two live Flags behind the identifier: dead-lettered after one write and one search, never retried."""
    settings = make_settings(fhir_base_url=double.base_url, relays=False, fhir_write_mode="conditional")
    env = await make_env(aiohttp_client, settings, timeout_s=2.0)
    try:
        for fid in ("x1", "x2"):
            double.flags[fid] = {
                "resourceType": "Flag",
                "id": fid,
                "status": "active",
                "meta": {"versionId": "1"},
                "identifier": [{"system": IDENTIFIER_SYSTEM, "value": "LA001|M"}],
            }
        await env.put("M", record("M"))
        await env.drain()
        dead = await env.dead()
        assert [d["reason"] for d in dead] == ["multiple-matches"]
        assert [r[1] for r in puts(double)] == ["PUT", "GET"]
    finally:
        await env.session.close()


async def test_auto_mode_picks_conditional_when_no_update_create(aiohttp_client, make_settings):
    double = FhirDouble(update_create=False, conditional_update=True, batch=False)
    await double.start()
    settings = make_settings(fhir_base_url=double.base_url, relays=False)
    env = await make_env(aiohttp_client, settings, timeout_s=2.0)
    try:
        for i in range(6):
            await env.put(f"K-{i}", record(f"K-{i}"))
        await env.drain()
        assert env.parts.server.mode == "conditional"
        assert double.state() == await env.expected()
        probe, *rest = puts(double)  # one PUT Flag/{uuid} tried first: refused, so conditional writes
        assert probe[2].startswith("Flag/") and probe[3] == 405
        assert rest and all(p.startswith("Flag?identifier=") for _t, _m, p, _s in rest)
        await env.put("K-0", record("K-0", endDate="2026-02-01"))
        await env.drain()
        assert double.state() == await env.expected() and len(double.flags) == 6
    finally:
        await env.session.close()
        await double.stop()


async def test_server_down_loses_nothing(aiohttp_client, make_settings, double):
    settings = make_settings(fhir_base_url="http://127.0.0.1:9/fhir", relays=False, fhir_write_mode="id")
    env = await make_env(aiohttp_client, settings, timeout_s=1.0)
    try:
        for i in range(5):
            await env.put(f"D-{i}", record(f"D-{i}"))
        for _ in range(3):
            await env.parts.relay.run_once()
        pending, _ = await env.parts.queue.stats(0)
        assert pending == 5
        env.parts.server.client.base_url = double.base_url  # the server comes back
        env.parts.server.client._paused_until = 0
        await env.drain()
        assert double.state() == await env.expected()
    finally:
        await env.session.close()


async def test_ended_window_turns_inactive_without_upload(env, double):
    env.clock.set_day(dt.date(2026, 2, 15))
    await env.put("E", record("E", startDate="2026-01-10", endDate="2026-02-01", planType="UCPP"))
    await env.put("O", record("O"))
    await env.drain()
    assert double.state()["LA001|E"][0] == "active"
    before = await env.records.store.get("LA001", "E")
    # the UCPP window is 28 days: visible to 2026-03-01, invisible from 2026-03-02
    env.clock.set_day(dt.date(2026, 3, 1))
    assert await env.parts.scheduler.run_once() == 0
    env.clock.set_day(dt.date(2026, 3, 2))
    assert await env.parts.scheduler.run_once() == 1
    await env.drain()
    assert double.state()["LA001|E"][0] == "inactive"
    assert double.state()["LA001|O"][0] == "active"
    after = await env.records.store.get("LA001", "E")
    assert before == after, "no new version was written"
    assert await env.parts.scheduler.run_once() == 0


async def test_scheduler_moves_each_member_once_with_several_processes(env, double):
    import asyncio

    for i in range(40):
        await env.put(f"S-{i}", record(f"S-{i}", startDate="2026-01-10", endDate="2026-02-01"))
    redis = env.parts.queue.redis
    await redis.delete(env.parts.queue.keys.sync_queue)
    await env.parts.queue.ensure_group()
    env.clock.set_day(dt.date(2027, 2, 1))
    moved = await asyncio.gather(*(env.parts.scheduler.run_once() for _ in range(4)))
    assert sum(moved) == 40
    assert await redis.xlen(env.parts.queue.keys.sync_queue) == 40


async def test_capability_check_logs_clearly(env, double, caplog):
    double.fhir_version = "3.0.2"
    with caplog.at_level(logging.INFO, logger="cpis_bridge.fhir.sync"):
        caps = await env.parts.server.prepare()
    assert not caps.r4
    assert any("not 4.0.x" in r.getMessage() for r in caplog.records)


async def _second_relay(env):
    """Another service process: its own HTTP session and FHIR client, the same Redis."""
    import aiohttp

    from cpis_bridge.app import KEYS, REDIS, SCRIPTS
    from cpis_bridge.compose import flag_sync_parts

    session = aiohttp.ClientSession()
    parts = flag_sync_parts(env.settings, env.app[REDIS], env.app[KEYS], env.app[SCRIPTS], session, clock=env.clock)
    parts.relay.block_ms = 20
    return parts, session


async def test_retry_after_seen_by_one_process_pauses_the_others(env, double):
    other, session = await _second_relay(env)
    try:
        double.faults.append(Fault(429, {"Retry-After": "1"}, outcome("throttled", "slow down")))
        await env.put("P-0", record("P-0"))
        await env.parts.relay.run_once()  # process A meets the 429
        answered = double.answered[-1]
        await env.put("P-1", record("P-1"))
        await other.relay.run_once()  # process B: must not write before Retry-After has passed
        assert all(r[0] <= answered for r in double.requests if r[2] != "metadata")
        await env.drain()
        await other.relay.run_once()
        assert double.state() == await env.expected()
        later = [r[0] for r in double.requests if r[0] > answered and r[2] != "metadata"]
        assert later and min(later) - answered >= 0.95
    finally:
        await session.close()


async def test_conditional_writes_are_serialised_per_identifier_across_processes(aiohttp_client, make_settings):
    import asyncio

    double = FhirDouble(update_create=False, conditional_update=True, batch=False)
    double.racy = True
    await double.start()
    settings = make_settings(fhir_base_url=double.base_url, relays=False, fhir_write_mode="conditional")
    env = await make_env(aiohttp_client, settings, timeout_s=5.0)
    other, session = await _second_relay(env)
    try:
        for i in range(5):
            await env.put(f"X-{i}", record(f"X-{i}"))
        first = await env.parts.queue.read("a", 100, 10)
        for i in range(5):
            await env.put(f"X-{i}", record(f"X-{i}", endDate="2026-02-01"))
        second = await other.queue.read("b", 100, 10)
        assert {(i.la, i.local_id) for i in first} == {(i.la, i.local_id) for i in second}
        await asyncio.gather(env.parts.relay.send(first), other.relay.send(second))
        await env.drain()
        values = [f["identifier"][0]["value"] for f in double.flags.values()]
        assert sorted(values) == sorted(set(values)), "one Flag per identifier: no duplicate conditional creates"
        assert double.state() == await env.expected()
    finally:
        await session.close()
        await env.session.close()
        await double.stop()


@pytest.mark.chaos
async def test_chaos_429_then_503_then_fine(env, double):
    """docs/quality.md: 429 with Retry-After, then 503, then fine -> exactly the current Flags; nothing sooner than
    Retry-After (bar requests already in flight when the 429 was answered)."""
    import random

    numbers = ["9990000018", "9990000026", "9990000034"]
    for i in range(1000):
        await env.put(f"Z-{i}", record(f"Z-{i}", nhs=numbers[i % 3]))
    env.parts.relay.batch = random.randint(50, 300)
    for _ in range(random.randint(0, 3)):
        await env.parts.relay.run_once()  # the fault lands at a random point of the backlog
    double.faults.append(Fault(429, {"Retry-After": "2"}, outcome("throttled", "slow down")))
    for _ in range(3):
        double.faults.append(Fault(503, {}, outcome("transient", "down")))
    for i in range(0, 1000, 7):  # newer versions keep arriving meanwhile
        await env.put(f"Z-{i}", record(f"Z-{i}", nhs=numbers[i % 3], endDate="2026-02-01"))
    await env.drain(timeout_s=50)
    assert double.state() == await env.expected()
    assert await env.dead() == []
    i429 = next(i for i, r in enumerate(double.requests) if r[3] == 429)
    answered = double.answered[i429]
    early = [r for r in double.requests if answered + 0.05 < r[0] < answered + 1.95]
    assert early == [], "no request sooner than Retry-After"
