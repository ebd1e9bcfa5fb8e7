"""Flag sync against the ways real FHIR servers behave (the double misbehaving on purpose, real Redis): empty answers
to `return=minimal` Bundles, 409s when conditional writes overlap, rate limits told only by `RateLimit` headers,
bare 412s and duplicate identifiers, servers that allow update-as-create without declaring it, and outages."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cpis_bridge.core.clock import epoch_ms
from cpis_bridge.fhir.client import rate_limit
from cpis_bridge.fhir.flag_sync import IDENTIFIER_SYSTEM, flag_id
from cpis_bridge.services.reconcile import compare, repair
from cpis_bridge.services.sync import PROBE_MAX_S
from tests.support.fhir_double import FhirDouble
from tests.support.sync import make_env
from tests.support.world import record

pytestmark = pytest.mark.timeout(60)
NUMBERS = ["9990000018", "9990000026", "9990000034"]


async def _env(aiohttp_client, make_settings, double: FhirDouble, timeout_s: float = 2.0, **overrides):
    settings = make_settings(fhir_base_url=double.base_url, relays=False, **overrides)
    return await make_env(aiohttp_client, settings, timeout_s=timeout_s)


@pytest.fixture
async def server():
    double = FhirDouble()
    await double.start()
    yield double
    await double.stop()


def _writes(double: FhirDouble) -> list[tuple[float, str, str, int]]:
    return [r for r in double.requests if r[2] != "metadata" and r[1] in ("PUT", "POST")]


async def _put_many(env, prefix: str, n: int, **fields) -> None:
    for i in range(n):
        await env.put(f"{prefix}{i}", record(f"{prefix}{i}", nhs=NUMBERS[i % 3], **fields))


# -- batches --------------------------------------------------------------------------------------------------


async def test_batches_get_an_answer_and_stay_on(aiohttp_client, make_settings, server, caplog):
    """The double answers `Prefer: return=minimal` Bundles with an empty 200: Bundles must ask for the
    batch-response, so backlogs keep going as Bundles and no entry is sent twice."""
    env = await _env(aiohttp_client, make_settings, server)
    try:
        with caplog.at_level(logging.WARNING, logger="cpis_bridge.fhir.sync"):
            await _put_many(env, "B", 30)
            await env.drain()
            await _put_many(env, "B", 30, endDate="2026-02-01")
            await env.drain()
        writes = _writes(server)
        assert [m for _t, m, _p, _s in writes] == ["POST"] * 2, "each backlog went as Bundles, nothing singly"
        assert server.state() == await env.expected()
        assert not any("batch" in r.getMessage() for r in caplog.records)
    finally:
        await env.session.close()


async def test_an_empty_2xx_to_a_bundle_is_verified_by_reading(aiohttp_client, make_settings, server):
    """A Bundle applied but answered with nothing: its outcome is read back, not guessed; nothing is resent, and
    batching stays on for the next backlog."""
    env = await _env(aiohttp_client, make_settings, server)
    try:
        server.blank_batch_answers = 1
        await _put_many(env, "V", 20)
        await env.drain()
        assert server.state() == await env.expected()
        assert [m for _t, m, _p, _s in _writes(server)] == ["POST"], "verified by searching, nothing resent"
        assert sum(1 for r in server.requests if r[1] == "GET" and r[2].startswith("Flag?identifier=")) == 20
        await _put_many(env, "V", 20, endDate="2026-02-01")
        await env.drain()
        assert [m for _t, m, _p, _s in _writes(server)] == ["POST", "POST"]
        assert server.state() == await env.expected()
    finally:
        await env.session.close()


# -- conflicts and concurrency --------------------------------------------------------------------------------


async def test_conflicts_shrink_concurrency_and_pause_nothing(aiohttp_client, make_settings):
    """409s from overlapping conditional writes back off those records and halve the requests in flight; they
    never pause the server for everyone (a 1 s first retry would otherwise stall each batch for seconds)."""
    double = FhirDouble(update_create=False, batch=False)
    double.conflict_above = 2
    double.pace = 400.0
    await double.start()
    env = await _env(
        aiohttp_client,
        make_settings,
        double,
        fhir_write_mode="conditional",
        delivery_first_retry_s=1.0,
        delivery_max_backoff_s=10.0,
    )
    try:
        await _put_many(env, "K", 60)
        t0 = time.monotonic()
        await env.drain(timeout_s=30)
        elapsed = time.monotonic() - t0
        assert double.state() == await env.expected()
        assert await env.dead() == []
        assert any(s == 409 for *_x, s in double.requests), "the double did conflict"
        assert elapsed < 2.5, f"60 writes at 400/s took {elapsed:.1f} s"
        assert env.parts.server.client.limit.limit < 8, "concurrency was decreased"
    finally:
        await env.session.close()
        await double.stop()


async def test_recovery_after_an_outage_keeps_pace_with_the_server(aiohttp_client, make_settings, server):
    """The server is down for seconds while changes pile up: once it is back, they arrive in about the server's
    own time for that many writes, not after the backoff the outage built up."""
    server.pace = 100.0
    env = await _env(
        aiohttp_client,
        make_settings,
        server,
        timeout_s=10.0,
        fhir_write_mode="id",
        delivery_first_retry_s=1.0,
        delivery_max_backoff_s=30.0,
    )
    try:
        await server.go_down()
        await _put_many(env, "O", 200)
        stop = time.monotonic() + 3.0
        while time.monotonic() < stop:
            await env.parts.relay.run_once()
            await asyncio.sleep(0.01)
        assert server.flags == {}
        await server.come_back()
        back = time.monotonic()
        await env.drain(timeout_s=40)
        recovery = time.monotonic() - back
        assert server.state() == await env.expected()
        own = await server.own_time(200, IDENTIFIER_SYSTEM)  # 2 s at its pace, more when the machine is busy
        assert recovery <= 1.5 * own + PROBE_MAX_S, f"{recovery:.2f} s to recover, the server's own time {own:.2f} s"
    finally:
        await env.session.close()


# -- rate limits ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["structured", "split"])
async def test_rate_limit_paced_by_remaining_and_reset(aiohttp_client, make_settings, style):
    """A limit told only by RateLimit headers (no Retry-After): requests wait for the window instead of being
    sent to be refused, so requests ~= changes."""
    double = FhirDouble(batch=False)
    double.rate_limit = (10, 1.0)
    double.rate_style = style
    await double.start()
    env = await _env(aiohttp_client, make_settings, double, fhir_write_mode="id")
    try:
        await _put_many(env, "R", 30)
        await env.drain(timeout_s=30)
        assert double.state() == await env.expected()
        sent = len(_writes(double))
        assert sent <= 33, f"{sent} requests for 30 changes"
    finally:
        await env.session.close()
        await double.stop()


def test_rate_limit_headers_in_each_shape():
    assert rate_limit({"RateLimit": '"default";r=0;t=30'}).remaining == 0
    got = rate_limit({"RateLimit": '"burst";r=5;t=1, "day";r=0;t=3600', "RateLimit-Policy": '"day";q=1000;w=86400'})
    assert (got.remaining, got.reset_s) == (0, 3600)
    got = rate_limit({"RateLimit": "limit=100, remaining=7, reset=30"})
    assert (got.remaining, got.reset_s) == (7, 30)
    got = rate_limit({"RateLimit-Remaining": "3", "RateLimit-Reset": "12"})
    assert (got.remaining, got.reset_s) == (3, 12)
    got = rate_limit({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 20)})
    assert got.remaining == 0 and 18 <= got.reset_s <= 21
    assert rate_limit({"Content-Type": "application/fhir+json"}) is None


# -- 412s and duplicates --------------------------------------------------------------------------------------


async def test_bare_412_with_a_duplicate_is_dead_lettered_and_reconcile_repairs_it(aiohttp_client, make_settings):
    """A second Flag with our identifier: the next conditional write gets a 412 with no body. A search on the
    identifier finds two live Flags: dead-lettered at once (no retries, no pause). reconcile keeps the one with our
    id, marks the other entered-in-error, and from then on the record's writes go to the kept Flag."""
    double = FhirDouble(update_create=True, batch=False)
    double.bare_412 = True
    await double.start()
    env = await _env(aiohttp_client, make_settings, double, fhir_write_mode="id")
    try:
        await env.put("D", record("D"))
        await env.put("F", record("F"))
        await env.drain()
        other = double.add_duplicate("LA001|D")
        env.parts.server.mode = "conditional"  # the same server written conditionally from now on
        await env.put("D", record("D", endDate="2026-02-01"))
        await env.put("F", record("F", endDate="2026-02-01"))
        await env.drain()
        dead = await env.dead()
        assert [(d["lid"], d["reason"]) for d in dead] == [("D", "multiple-matches")]
        assert env.parts.server.paused_for() == 0
        assert double.state()["LA001|F"][2] == "2026-02-01"

        windows = env.settings.windows
        day = env.clock().date()
        drift, wanted, found = await compare(env.parts.server, env.parts.queue.all_records(), day=day, windows=windows)
        assert drift.duplicates == ["LA001|D"] and drift.total >= 1
        await repair(env.parts.server, drift, wanted, found)
        assert double.flags[other]["status"] == "entered-in-error"
        assert double.flags[flag_id("LA001", "D")]["period"].get("end") == "2026-02-01"
        after, _, _ = await compare(env.parts.server, env.parts.queue.all_records(), day=day, windows=windows)
        assert after.total == 0

        await env.put("D", record("D", endDate="2026-03-01"))  # conditional again: 412, then the kept Flag by id
        await env.drain()
        assert double.flags[flag_id("LA001", "D")]["period"]["end"] == "2026-03-01"
        assert double.flags[other]["status"] == "entered-in-error"
        assert len(await env.dead()) == 1
    finally:
        await env.session.close()
        await double.stop()


async def test_a_412_that_never_clears_is_dead_lettered_in_bounded_time(aiohttp_client, make_settings, server):
    server.reject["LA001|P"] = (412, None)  # bare, every time, one Flag or none behind it: a version conflict
    env = await _env(aiohttp_client, make_settings, server, fhir_write_mode="conditional")
    try:
        await env.put("P", record("P"))
        await env.put("G", record("G"))
        await env.drain(timeout_s=20)
        dead = await env.dead()
        assert [(d["lid"], d["reason"], d["status"]) for d in dead] == [("P", "version-conflict", "412")]
        assert set(server.state()) == {"LA001|G"}
        assert env.parts.server.paused_for() == 0
    finally:
        await env.session.close()


# -- ids ------------------------------------------------------------------------------------------------------


async def test_auto_keeps_our_ids_where_put_by_id_is_accepted(aiohttp_client, make_settings):
    """The CapabilityStatement does not declare updateCreate, but PUT Flag/{uuid} creates: auto mode keeps id
    writes, so the server's Flag ids are the ED API's."""
    double = FhirDouble(update_create=True, conditional_update=True)
    double.declared_update_create = False
    await double.start()
    env = await _env(aiohttp_client, make_settings, double)
    try:
        await _put_many(env, "I", 8)
        await env.drain()
        assert env.parts.server.mode == "id"
        assert set(double.flags) == {flag_id("LA001", f"I{i}") for i in range(8)}
        assert double.state() == await env.expected()
    finally:
        await env.session.close()
        await double.stop()


async def test_queue_items_keep_their_attempts_across_retries(aiohttp_client, make_settings, server):
    """Per-record backoff: a record that keeps failing waits longer each time; another record is not held back."""
    server.reject["LA001|S"] = (500, None)
    env = await _env(aiohttp_client, make_settings, server, fhir_write_mode="id")
    try:
        await env.put("S", record("S"))
        for _ in range(3):
            await env.parts.relay.run_once()
            await env.parts.queue.move_due(epoch_ms(env.clock()) + 60_000)
        await env.put("T", record("T"))
        await env.parts.relay.run_once()
        assert "LA001|T" in server.state()
        members = await env.parts.queue.redis.zrange(env.parts.queue.keys.sync_delay, 0, -1)
        assert [m.split("\x1f")[3] for m in members] == ["4"], "la, lid, queued, attempts, tombstone"
    finally:
        await env.session.close()
