"""One LA's broken endpoint must not silence the others: per-endpoint concurrency cap, circuit breaker (open,
half-open probe, close), entries held aside without attempts, and stored data that cannot be built dead-lettered
at once without blocking what follows. Real Redis, real receivers on 127.0.0.1 that hang, refuse or crawl."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import pytest

from cpis_bridge.app import KEYS, REDIS
from cpis_bridge.core.access import SEP, notification_id
from cpis_bridge.web.state import METRICS
from tests.support.delivery import access, client_factory, flag, webhook
from tests.support.polling import wait_for, wait_for_async
from tests.support.receivers import Receiver
from tests.support.world import OPS

CHILD_A = "9990000018"  # LA001's
CHILD_B = "9990000026"  # LA002's
SECRET_2 = "LA002_WEBHOOK_SECRET"


@pytest.fixture
def make_client(make_settings, aiohttp_client, tmp_path, monkeypatch):
    return client_factory(make_settings, aiohttp_client, tmp_path, monkeypatch)


@pytest.fixture
async def receivers():
    made: list[Receiver] = []

    async def make(**kw: Any) -> Receiver:
        r = await Receiver(**kw).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.recover()
        await r.stop()


async def many(app: Any, n: int, nhs: str, prefix: str) -> list[Any]:
    out = []
    for start in range(0, n, 100):
        out += await asyncio.gather(*(access(app, f"{prefix}{i}", nhs) for i in range(start, min(start + 100, n))))
    return out


def metric(app: Any, line: str) -> float | None:
    for row in app[METRICS].exposition().decode().splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return None


async def owed(app: Any, la: str, channel: str = "webhook") -> int:
    """Notifications still owed to the LA's endpoint (queued, retrying or held), read in one transaction: entries
    move between these structures as the relay works."""
    redis, keys = app[REDIS], app[KEYS]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xrange(keys.notify_queue)
        pipe.zrange(keys.notify_delay, 0, -1)
        pipe.zcard(keys.notify_held(la, channel))
        pipe.xlen(keys.dead_letters)
        queued, delayed, held, dead = await pipe.execute()
    assert dead == 0
    return sum(f["la"] == la for _, f in queued) + sum(f'"la","{la}"' in m for m in delayed) + held


async def arrivals_within(sent: dict[str, float], receiver: Receiver, seconds: float) -> list[float]:
    """Wait for every notification in ``sent`` (id -> when its access was made) and return each one's delay."""
    await wait_for(lambda: set(sent) <= set(receiver.accepted), timeout=seconds)
    first = {}
    for attempt in receiver.attempts:
        if attempt.id in sent and attempt.status == 200:
            first.setdefault(attempt.id, attempt.at)
    return [first[i] - sent[i] for i in sent]


@pytest.mark.parametrize("mode", ["hung", "refused"])
async def test_a_broken_endpoint_with_hundreds_queued_does_not_delay_another_la(make_client, receivers, mode):
    healthy = await receivers()
    broken = await receivers(hung=True)
    if mode == "refused":
        await broken.stop()
    client = await make_client(
        {"LA001": webhook(healthy), "LA002": webhook(broken, SECRET_2)},
        {"LA001_WEBHOOK_SECRET": healthy.secret, SECRET_2: broken.secret},
        delivery_timeout_s=10.0,
        shutdown_grace_s=0.1,
        delivery_breaker_cooldown_s=30.0,
        delivery_endpoint_concurrency=8,
    )
    app = client.app
    await flag(app, "LA001", "A-1", CHILD_A)
    await flag(app, "LA002", "B-1", CHILD_B)
    await many(app, 500, CHILD_B, "b")
    if mode == "hung":
        await wait_for(lambda: broken.in_flight >= 1)  # the relay is busy with LA002's entries
    sent: dict[str, float] = {}
    for i in range(20):
        out = await access(app, f"a{i}", CHILD_A)
        sent[notification_id(out.access_id, "LA001")] = time.monotonic()
        await asyncio.sleep(0.02)
    delays = await arrivals_within(sent, healthy, 5.0)
    assert max(delays) < 1.5, sorted(delays)[-3:]
    assert broken.max_in_flight <= 8  # CPIS_DELIVERY_ENDPOINT_CONCURRENCY
    assert await owed(app, "LA002") == 500  # nothing of LA002's lost or dead-lettered: all still owed


async def test_breaker_opens_holds_without_attempts_probes_and_closes(make_client, receivers, caplog):
    caplog.set_level(logging.INFO, logger="cpis_bridge.delivery")
    r = await receivers(hung=True)
    client = await make_client(
        {"LA002": {"fhir": {"baseUrl": r.base}}},
        delivery_timeout_s=0.3,
        delivery_breaker_failures=3,
        delivery_breaker_cooldown_s=1.0,
        delivery_endpoint_concurrency=2,
        delivery_max_backoff_s=1.0,
    )
    app = client.app
    redis, keys = app[REDIS], app[KEYS]
    await flag(app, "LA002", "B-1", CHILD_B)
    outs = await many(app, 40, CHILD_B, "e")
    is_open = 'cpis_delivery_breaker_open{channel="fhir",la="LA002"}'
    await wait_for(lambda: metric(app, is_open) == 1.0, timeout=5)
    await wait_for(lambda: r.in_flight == 0, timeout=2)  # the attempts made before it opened have timed out
    before = len(r.attempts)
    transitions = 'cpis_delivery_breaker_transitions_total{channel="fhir",la="LA002",state="%s"}'
    probes = metric(app, transitions % "half-open")
    # two cool-downs pass (each ends in a half-open probe), however slowly the machine runs
    await wait_for(lambda: metric(app, transitions % "half-open") >= probes + 2, timeout=10)
    # Open: the entries wait in the endpoint's held set; only a probe per cool-down reaches the endpoint.
    assert len(r.attempts) - before <= 3, len(r.attempts) - before
    assert r.max_in_flight <= 2
    assert await redis.zcard(keys.notify_held("LA002", "fhir")) >= 30
    assert await owed(app, "LA002", "fhir") == 40
    r.recover()
    await wait_for(lambda: len(r.accepted) == 40, timeout=10)
    assert set(r.accepted) == {notification_id(o.access_id, "LA002") for o in outs}
    await wait_for(lambda: metric(app, is_open) == 0.0, timeout=2)
    assert metric(app, transitions % "open") >= 1 and metric(app, transitions % "half-open") >= 1
    assert metric(app, transitions % "closed") >= 1
    # Held entries never counted attempts: every "retried" is a real failed request at the receiver.
    retried = metric(app, 'cpis_deliveries_total{channel="fhir",outcome="retried"}')
    assert retried == len([a for a in r.attempts if a.status is None])
    events = [rec.getMessage() for rec in caplog.records]
    assert "delivery.breaker_open" in events and "delivery.breaker_closed" in events
    opened = next(rec for rec in caplog.records if rec.getMessage() == "delivery.breaker_open")
    assert opened.la == "LA002" and opened.channel == "fhir"
    await wait_for(lambda: not r.in_flight, timeout=2)
    assert await redis.exists(keys.notify_held("LA002", "fhir")) == 0
    assert await redis.scard(keys.notify_held_index) == 0


async def test_held_entries_still_reach_the_dead_letters_at_the_maximum_age(make_client, receivers):
    r = await receivers(hung=True)
    client = await make_client(
        {"LA002": webhook(r, SECRET_2)},
        {SECRET_2: r.secret},
        delivery_timeout_s=0.2,
        delivery_breaker_failures=2,
        delivery_breaker_cooldown_s=30.0,
        delivery_endpoint_concurrency=2,
        delivery_max_age_h=2.0 / 3600,
    )
    app = client.app
    await flag(app, "LA002", "B-1", CHILD_B)
    await many(app, 30, CHILD_B, "m")
    redis, keys = app[REDIS], app[KEYS]
    await wait_for(lambda: metric(app, 'cpis_delivery_breaker_open{channel="webhook",la="LA002"}') == 1.0)
    await wait_for_async(lambda: _at_least(redis.xlen(keys.dead_letters), 30), timeout=6, what="30 dead letters")
    letters = [f for _, f in await redis.xrange(keys.dead_letters)]
    assert {f["reason"] for f in letters} == {"max-age"} and len(letters) == 30
    assert len(r.attempts) <= 4  # the breaker opened after 2; nothing was attempted once it was open
    assert await redis.zcard(keys.notify_held("LA002", "webhook")) == 0


async def test_per_endpoint_cap_holds_for_a_slow_endpoint_and_others_flow(make_client, receivers):
    slow = await receivers(slow_s=0.25)
    healthy = await receivers()
    client = await make_client(
        {"LA001": webhook(healthy), "LA002": webhook(slow, SECRET_2)},
        {"LA001_WEBHOOK_SECRET": healthy.secret, SECRET_2: slow.secret},
        delivery_timeout_s=5.0,
        delivery_endpoint_concurrency=3,
    )
    app = client.app
    await flag(app, "LA001", "A-1", CHILD_A)
    await flag(app, "LA002", "B-1", CHILD_B)
    await many(app, 60, CHILD_B, "s")
    await wait_for(lambda: slow.in_flight >= 1)
    sent = {}
    for i in range(10):
        out = await access(app, f"a{i}", CHILD_A)
        sent[notification_id(out.access_id, "LA001")] = time.monotonic()
    delays = await arrivals_within(sent, healthy, 3.0)
    assert max(delays) < 1.0, delays
    # Slow answers are answers: the breaker stays closed and everything arrives, never more than 3 at a time.
    slow.slow_s = 0.05
    await wait_for(lambda: len(slow.attempts) >= 60 and not slow.in_flight, timeout=30)
    assert slow.max_in_flight <= 3
    assert metric(app, 'cpis_delivery_breaker_open{channel="webhook",la="LA002"}') in (None, 0.0)


async def test_unbuildable_entries_are_dead_lettered_at_once_and_never_block_the_rest(make_client, receivers):
    """Entries written straight into Redis the way bad stored data would look: an access instant no datetime can
    hold (year 0), records that are not JSON, a queue entry with unreadable fields, one whose inbox entry is gone.
    Each is dead-lettered with its reason on the first try; the good entries around them are delivered."""
    r = await receivers()
    client = await make_client({"LA001": webhook(r)}, {"LA001_WEBHOOK_SECRET": r.secret}, relays=False)
    app = client.app
    redis, keys = app[REDIS], app[KEYS]
    await flag(app, "LA001", "A-1", CHILD_A)
    good = [await access(app, "g0", CHILD_A)]
    [(ref, fields)] = await redis.xrange(keys.inbox("LA001"))
    [(_, queued)] = await redis.xrange(keys.notify_queue)
    parts = fields["acc"].split(SEP)
    year0 = SEP.join([parts[0], "bad-instant", "-62135600400000", *parts[3:]])
    await redis.lpush(keys.accesses(fields["tag"]), year0)  # in the child's history too: later ones read it
    bad_instant = await redis.xadd(
        keys.inbox("LA001"), {**fields, "acc": year0, "n": str(await redis.llen(keys.accesses(fields["tag"])))}
    )
    bad_records = await redis.xadd(keys.inbox("LA001"), {**fields, "recs": "{not json"})
    for bad_ref in (bad_instant, bad_records, "1-1"):
        await redis.xadd(keys.notify_queue, {"la": "LA001", "ref": bad_ref})
    await redis.xadd(keys.notify_queue, {**queued, "n": "not-a-number"})
    good += [await access(app, f"g{i}", CHILD_A) for i in range(1, 4)]
    await make_client({"LA001": webhook(r)}, {"LA001_WEBHOOK_SECRET": r.secret})  # a relay starts
    want = {notification_id(o.access_id, "LA001") for o in good}
    await wait_for(lambda: want <= set(r.accepted), timeout=5)

    async def settled() -> bool:
        return not await redis.xlen(keys.notify_queue) and await redis.xlen(keys.dead_letters) >= 4

    await wait_for_async(settled, timeout=5, what="the bad entries were not settled")
    letters = sorted((f["ref"], f["reason"], f.get("detail", "")) for _, f in await redis.xrange(keys.dead_letters))
    assert sorted(letters) == sorted(
        [
            (bad_instant, "unbuildable", "render: ValueError"),
            (bad_records, "unbuildable", "render: JSONDecodeError"),
            ("1-1", "inbox-entry-missing", ""),
            (ref, "unbuildable", "queue entry: unreadable field"),
        ]
    )
    assert await redis.zcard(keys.notify_delay) == 0  # nothing left to retry every minute
    assert set(r.accepted) == want  # the later notifications of the same child leave the bad access out
    latest = r.accepted[notification_id(good[-1].access_id, "LA001")][0]
    assert "bad-instant" not in {a["sourceEventId"] for a in latest["recentAccesses"]}
    body = await (await client.get("/v1/admin/deliveries", headers=OPS)).json()
    assert body["channels"]["webhook"]["dead"] == 4
    assert body["channels"]["webhook"]["pending"] == body["channels"]["webhook"]["retrying"] == 0


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n
