"""Notification delivery end to end against real Redis and real misbehaving receivers on 127.0.0.1: signatures,
two LAs on one child, backoff, Retry-After, timeouts, connection refused, 410, dead letters, max age, FHIR."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import uuid
from collections.abc import Awaitable

import orjson
import pytest
from fhir.resources.R4B.communication import Communication

from cpis_bridge.app import KEYS, REDIS, SCRIPTS
from cpis_bridge.core.access import notification_id
from cpis_bridge.notify.fhir import NS_COMMUNICATION
from cpis_bridge.notify.observer import MetricsObserver
from cpis_bridge.services.delivery import Relay, RelayConfig, RetryPolicy
from cpis_bridge.store.outbox import RedisOutbox
from cpis_bridge.web.state import METRICS
from tests.support.delivery import NHS, access, client_factory, flag, webhook
from tests.support.polling import wait_for, wait_for_async
from tests.support.receivers import Receiver
from tests.support.world import LA1, LA2, OPS


@pytest.fixture
async def receiver():
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
def make_client(make_settings, aiohttp_client, tmp_path, monkeypatch):
    return client_factory(make_settings, aiohttp_client, tmp_path, monkeypatch)


async def test_two_las_each_get_their_own_signed_notification(make_client):
    r1, r2 = await Receiver().start(), await Receiver().start()
    try:
        client = await make_client(
            {"LA001": webhook(r1), "LA002": webhook(r2, "LA002_WEBHOOK_SECRET")},
            {"LA001_WEBHOOK_SECRET": r1.secret, "LA002_WEBHOOK_SECRET": r2.secret},
        )
        app = client.app
        await flag(app, "LA001", "A-1")
        await flag(app, "LA002", "B-1", planType="LAC")
        await access(app, "e1")
        second = await access(app, "e2", cs="RXX02")
        await wait_for(lambda: len(r1.accepted) == 2 and len(r2.accepted) == 2)
        assert r1.bad_signatures == r2.bad_signatures == 0
        for r, la, lid in ((r1, "LA001", "A-1"), (r2, "LA002", "B-1")):
            bodies = [b[0] for b in r.accepted.values()]
            latest = next(b for b in bodies if b["access"]["sourceEventId"] == "e2")
            assert latest["type"] == "cpis.access" and latest["localAuthority"] == {"ods": la}
            assert latest["subject"] == {"nhsNumber": NHS}
            assert [x["localId"] for x in latest["records"]] == [lid]
            assert latest["access"]["id"] == second.access_id
            assert latest["access"]["careSetting"] == {
                "ods": "RXX02",
                "name": "Example Urgent Treatment Centre",
                "type": "UTC",
            }
            assert latest["access"]["user"] == {"id": "u-RXX02", "name": "Test User", "roleCode": "R0001"}
            assert [a["sourceEventId"] for a in latest["recentAccesses"]] == ["e2", "e1"]
            assert latest["recentAccesses"][0] == latest["access"]
            assert set(latest) == {
                "type",
                "id",
                "createdAt",
                "localAuthority",
                "subject",
                "records",
                "access",
                "recentAccesses",
            }
        # The same notification in the pull inbox is the same body.
        page = await (await client.get("/v1/notifications", headers=LA1)).json()
        assert len(page["notifications"]) == 2
        for item in page["notifications"]:
            assert item.pop("acknowledged") is False
            assert r1.accepted[item["id"]][0] == item
        assert set(r1.accepted).isdisjoint(r2.accepted)
    finally:
        await r1.stop()
        await r2.stop()


async def test_500s_are_retried_with_growing_backoff_until_delivered(make_client, receiver, caplog):
    """The schedule is checked as the relay decided it (its ``relay.attempt_failed`` log line says when the retry is
    due): each delay within the equal-jitter band of its doubling base, and no attempt ever earlier than its delay.
    Wall-clock gaps are only bounded below, so a busy machine cannot fail the test by being slow."""
    caplog.set_level(logging.INFO, logger="cpis_bridge.delivery")
    receiver.behaviour = lambda n, _: 500 if n <= 4 else 200
    client = await make_client(
        {"LA001": webhook(receiver)},
        {"LA001_WEBHOOK_SECRET": receiver.secret},
        delivery_first_retry_s=0.1,
        delivery_max_backoff_s=2.0,
    )
    await flag(client.app)
    await access(client.app, "e1")
    await wait_for(lambda: len(receiver.accepted) == 1)
    times = [a.at for a in receiver.attempts]
    assert len(times) == 5 and len({a.id for a in receiver.attempts}) == 1
    failed = [r for r in caplog.records if r.getMessage() == "relay.attempt_failed"]
    assert [(r.attempt, r.status) for r in failed] == [(k, 500) for k in range(1, 5)]
    delays = [r.retry_in_ms / 1000 for r in failed]
    # equal jitter: the k-th retry waits between half and all of 0.1 * 2^(k-1)
    for k, delay in enumerate(delays):
        base = 0.1 * 2**k
        assert base / 2 - 0.001 <= delay <= base + 0.001, delays
    assert delays[3] > delays[1] > 0.05  # growing: the 4th waits at least 0.4 s, the 2nd at most 0.2 s
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= delay - 0.01 for gap, delay in zip(gaps, delays, strict=True)), (gaps, delays)
    # The receiver records the acceptance before the relay has read the reply: wait for the relay's count.
    delivered = 'cpis_deliveries_total{channel="webhook",outcome="delivered"} 1.0'
    await wait_for(lambda: delivered in client.app[METRICS].exposition().decode())
    metrics = client.app[METRICS].exposition().decode()
    assert 'cpis_deliveries_total{channel="webhook",outcome="retried"} 4.0' in metrics


async def test_slow_answers_time_out_and_are_retried(make_client, receiver):
    receiver.slow_s = 1.0
    client = await make_client({"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret})
    await flag(client.app)
    await access(client.app, "e1")
    await wait_for(lambda: len(receiver.attempts) >= 2, timeout=5)
    receiver.slow_s = 0
    await wait_for(lambda: len(receiver.accepted) == 1, timeout=5)
    assert all(a.status is None for a in receiver.attempts[:2])


async def test_429_retry_after_pauses_the_endpoint(make_client, receiver):
    receiver.behaviour = lambda n, _: 429 if n == 1 else 200
    receiver.retry_after = "1"
    client = await make_client({"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret})
    await flag(client.app)
    await access(client.app, "e1")
    await wait_for(lambda: len(receiver.attempts) == 1)
    await access(client.app, "e2")  # queued while the endpoint is paused: waits too
    await wait_for(lambda: len(receiver.accepted) == 2, timeout=5)
    first = receiver.attempts[0].at
    assert all(a.at - first >= 0.95 for a in receiver.attempts[1:]), [a.at - first for a in receiver.attempts]


async def test_receiver_down_then_back_gets_everything(make_client):
    receiver = await Receiver().start()
    port = receiver.port
    await receiver.stop()  # connection refused from here on
    # The outage is refused connections (immediate), so the factory's 0.3 s attempt timeout plays no part; under a
    # heavy load it would make a slow 2xx a timed-out attempt, retried: a legitimate at-least-once duplicate.
    client = await make_client(
        {"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret}, delivery_timeout_s=10.0
    )
    await flag(client.app)
    results = await asyncio.gather(*(access(client.app, f"e{i}") for i in range(60)))
    await asyncio.sleep(1.5)  # the outage lasts 1.5 s: every entry tried, then retrying or held by the breaker
    redis, keys = client.app[REDIS], client.app[KEYS]  # waiting: retries, or held while the breaker is open
    assert await redis.zcard(keys.notify_delay) + await redis.zcard(keys.notify_held("LA001", "webhook")) > 0
    receiver.port = port
    await receiver.start()
    try:
        await wait_for(lambda: len(receiver.accepted) == 60, timeout=10)
        assert sorted(b[0]["access"]["id"] for b in receiver.accepted.values()) == sorted(r.access_id for r in results)
        assert max(len(v) for v in receiver.accepted.values()) == 1
    finally:
        await receiver.stop()


async def test_an_attempt_outlasting_the_claim_idle_time_is_not_sent_again(make_client, receiver):
    """An entry stays pending in the group while its attempt runs: once it has been idle longer than the claim idle
    time, XAUTOCLAIM (by this relay's own reclaim step too) must not hand it to a second sender while the first
    attempt is still running. The receiver accepts the first copy and answers only after 3 claim idle times."""
    answered = asyncio.Event()

    async def slow_answer(_body: object) -> None:
        if not answered.is_set():
            await asyncio.sleep(1.5)
            answered.set()

    receiver.on_accept = slow_answer
    client = await make_client(
        {"LA001": webhook(receiver)},
        {"LA001_WEBHOOK_SECRET": receiver.secret},
        delivery_timeout_s=10.0,
        relay_claim_idle_s=0.5,
        relay_reclaim_interval_s=0.05,
    )
    await flag(client.app)
    await access(client.app, "e1")
    await asyncio.wait_for(answered.wait(), timeout=15)
    redis, keys = client.app[REDIS], client.app[KEYS]
    await wait_for_async(lambda: _is_zero(redis.xlen(keys.notify_queue)), what="entry not settled")
    await asyncio.sleep(0.3)  # a second copy, had it been dispatched, would have reached the receiver by now
    assert len(receiver.attempts) == 1 and [len(v) for v in receiver.accepted.values()] == [1]


async def _is_zero(n: Awaitable[int]) -> bool:
    return await n == 0


async def test_410_dead_letters_at_once_and_ops_can_requeue(make_client, receiver):
    receiver.behaviour = lambda n, _: 410 if n == 1 else 200
    client = await make_client({"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret})
    await flag(client.app)
    await access(client.app, "e1")
    redis, keys = client.app[REDIS], client.app[KEYS]
    await wait_for(lambda: len(receiver.attempts) == 1)
    await wait_for_async(lambda: _has(redis.xlen(keys.dead_letters)), what="no dead letter")
    [(dead_id, fields)] = await redis.xrange(keys.dead_letters)
    assert fields["channel"] == "webhook" and fields["reason"] == "gone" and fields["status"] == "410"
    assert NHS not in orjson.dumps(fields).decode()
    r = await client.get("/v1/admin/deliveries", headers=OPS)
    body = await r.json()
    assert body["channels"]["webhook"]["dead"] == 1 and body["channels"]["webhook"]["pending"] == 0
    assert set(body["channels"]) == {"webhook", "fhir", "inbox", "flag-sync"}
    assert set(body["channels"]["fhir"]) == {"pending", "retrying", "dead", "oldestPendingSeconds"}
    assert (await client.get("/v1/admin/deliveries", headers=LA1)).status == 403
    assert (await client.post("/v1/admin/dead-letters/1-1/retry", headers=OPS)).status == 404
    assert (await client.post("/v1/admin/dead-letters/nope/retry", headers=OPS)).status == 404
    assert (await client.post(f"/v1/admin/dead-letters/{dead_id}/retry", headers=OPS)).status == 204
    await wait_for(lambda: len(receiver.accepted) == 1)
    assert await redis.xlen(keys.dead_letters) == 0
    assert len(receiver.attempts) == 2


async def test_other_4xx_retried_at_capped_interval(make_client, receiver):
    receiver.behaviour = lambda n, _: 400 if n <= 2 else 200
    client = await make_client(
        {"LA001": webhook(receiver)},
        {"LA001_WEBHOOK_SECRET": receiver.secret},
        delivery_first_retry_s=0.05,
        delivery_max_backoff_s=0.4,
    )
    await flag(client.app)
    await access(client.app, "e1")
    await wait_for(lambda: len(receiver.accepted) == 1, timeout=5)
    t = [a.at for a in receiver.attempts]
    assert all(b - a >= 0.35 for a, b in itertools.pairwise(t)), t


async def test_max_age_dead_letters_and_counts(make_client, receiver):
    receiver.behaviour = lambda n, _: 503
    client = await make_client(
        {"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret}, delivery_max_age_h=0.6 / 3600
    )
    await flag(client.app)
    await access(client.app, "e1")
    redis, keys = client.app[REDIS], client.app[KEYS]
    await wait_for_async(lambda: _has(redis.xlen(keys.dead_letters)), timeout=5, what="no dead letter")
    [(_, fields)] = await redis.xrange(keys.dead_letters)
    assert fields["reason"] == "max-age"
    assert len(receiver.attempts) >= 3
    assert await redis.zcard(keys.notify_delay) == 0 and await redis.xlen(keys.notify_queue) == 0
    metrics = client.app[METRICS].exposition().decode()
    assert 'cpis_deliveries_total{channel="webhook",outcome="dead"}' in metrics


async def test_missing_secret_keeps_notifications_waiting(make_client, receiver, monkeypatch):
    monkeypatch.delenv("LA001_WEBHOOK_SECRET", raising=False)
    client = await make_client({"LA001": webhook(receiver)})
    await flag(client.app)
    await access(client.app, "e1")
    await asyncio.sleep(0.5)
    assert receiver.attempts == []
    body = await (await client.get("/v1/admin/deliveries", headers=OPS)).json()
    webhook_stats = body["channels"]["webhook"]
    assert webhook_stats["pending"] + webhook_stats["retrying"] == 1 and webhook_stats["dead"] == 0
    assert webhook_stats["oldestPendingSeconds"] > 0.3


async def test_fhir_channel_puts_a_valid_r4_communication(make_client, receiver):
    client = await make_client({"LA002": {"fhir": {"baseUrl": receiver.base}}})
    await flag(client.app, "LA002", "B-1")
    await access(client.app, "e1")
    await wait_for(lambda: len(receiver.accepted) == 1)
    [(nid, [resource])] = receiver.accepted.items()
    inner = resource.pop("_notification")
    comm = Communication.model_validate(resource)
    assert comm.status == "completed"
    assert comm.id == str(uuid.uuid5(NS_COMMUNICATION, nid))
    assert comm.subject.identifier.value == NHS
    assert comm.recipient[0].identifier.value == "LA002"
    attachment = comm.payload[0].contentAttachment
    assert attachment.contentType == "application/json"
    assert orjson.loads(base64.b64decode(resource["payload"][0]["contentAttachment"]["data"])) == inner
    assert inner["id"] == nid and inner["localAuthority"] == {"ods": "LA002"}


async def test_fhir_channel_authenticates_with_oauth2_client_credentials(make_client):
    from tests.support.fhir_double import FhirDouble

    double = FhirDouble(token="not-yet-issued")
    await double.start()
    try:
        auth = {
            "mode": "client-secret",
            "tokenUrl": f"{double.root}/token",
            "clientId": "cpis-la002",
            "clientSecretEnv": "LA002_FHIR_SECRET",
            "scope": "system/Communication.write",
        }
        client = await make_client(
            {"LA002": {"fhir": {"baseUrl": double.base_url, "auth": auth}}}, {"LA002_FHIR_SECRET": "s3cret-for-tests"}
        )
        await flag(client.app, "LA002", "B-1")
        await access(client.app, "e-oauth")
        await wait_for(lambda: len(double.communications) == 1)
        assert double.last_token_auth == "Basic " + base64.b64encode(b"cpis-la002:s3cret-for-tests").decode()
        assert double.last_token_form["scope"] == "system/Communication.write"
        [resource] = double.communications.values()
        assert resource["resourceType"] == "Communication"
        assert resource["recipient"][0]["identifier"]["value"] == "LA002"
    finally:
        await double.stop()


async def test_two_relays_share_the_work_without_duplicates(make_client, receiver):
    las = {"LA001": webhook(receiver)}
    secrets = {"LA001_WEBHOOK_SECRET": receiver.secret}
    # Timeouts well above the receiver's answer time: a timed-out attempt is (rightly) retried and would count twice.
    a = await make_client(las, secrets, delivery_timeout_s=5.0, relay_claim_idle_s=30.0)
    b = await make_client(las, secrets, delivery_timeout_s=5.0, relay_claim_idle_s=30.0)
    await flag(a.app)
    for start in range(0, 150, 50):
        await asyncio.gather(*(access(a.app if i % 2 else b.app, f"e{i}") for i in range(start, start + 50)))
    await wait_for(lambda: len(receiver.attempts) >= 150, timeout=10)

    def delivered() -> list[float]:
        return [c.app[METRICS].deliveries.labels("webhook", "delivered")._value.get() for c in (a, b)]

    # The receiver records the acceptance before the relay has read the reply: wait for the relays' counts.
    await wait_for(lambda: sum(delivered()) >= 150, timeout=10)
    assert len(receiver.accepted) == 150 and len(receiver.ids()) == 150
    done = delivered()
    assert sum(done) == 150 and min(done) > 0, done


async def test_relay_stopping_releases_in_flight_entries(make_client, receiver):
    las = {"LA001": webhook(receiver)}
    secrets = {"LA001_WEBHOOK_SECRET": receiver.secret}
    receiver.slow_s = 5.0
    a = await make_client(las, secrets, shutdown_grace_s=0.2, delivery_timeout_s=10.0, relay_claim_idle_s=60.0)
    await flag(a.app)
    await access(a.app, "e1")
    await wait_for(lambda: len(receiver.attempts) == 1)
    await a.close()  # cleanup_ctx: the relay gives the entry back instead of holding it for the claim timeout
    receiver.slow_s = 0
    b = await make_client(las, secrets, relay_claim_idle_s=60.0)
    await wait_for(lambda: len(receiver.accepted) == 1, timeout=5)
    assert await b.app[REDIS].xpending(b.app[KEYS].notify_queue, "relays") is not None


async def test_entries_of_a_dead_consumer_are_reclaimed(make_client, receiver):

    client = await make_client({"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret}, relays=False)
    app = client.app
    await flag(app)
    await access(app, "e1")
    outbox = RedisOutbox(
        app[REDIS], app[KEYS], __import__("cpis_bridge.store.scripts").store.scripts.Scripts(app[REDIS])
    )
    await outbox.ensure_group()
    taken = await outbox.read("crashed-consumer", 10, 100)
    assert len(taken) == 1  # read, never settled: its consumer "died"
    await make_client({"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret}, relay_claim_idle_s=0.5)
    await wait_for(lambda: len(receiver.accepted) == 1, timeout=5)


async def test_inbox_only_la_lists_and_acknowledges(make_client):
    client = await make_client({})
    app = client.app
    await flag(app)
    await flag(app, "LA002", "B-1")
    for i in range(5):
        await access(app, f"e{i}")
    r = await client.get("/v1/notifications?limit=2", headers=LA1)
    assert r.status == 200
    page1 = await r.json()
    assert [n["access"]["sourceEventId"] for n in page1["notifications"]] == ["e0", "e1"]
    page2 = await (await client.get(f"/v1/notifications?limit=2&after={page1['next']}", headers=LA1)).json()
    page3 = await (await client.get(f"/v1/notifications?after={page2['next']}", headers=LA1)).json()
    assert [n["access"]["sourceEventId"] for n in page2["notifications"] + page3["notifications"]] == ["e2", "e3", "e4"]
    empty = await (await client.get(f"/v1/notifications?after={page3['next']}", headers=LA1)).json()
    assert empty["notifications"] == [] and empty["next"]
    nid = page1["notifications"][1]["id"]
    assert (await client.post(f"/v1/notifications/{nid}/ack", headers=LA2)).status == 404
    assert (await client.post(f"/v1/notifications/{nid}/ack", headers=LA1)).status == 204
    assert (await client.post(f"/v1/notifications/{nid}/ack", headers=LA1)).status == 204
    assert (await client.post("/v1/notifications/not-an-id/ack", headers=LA1)).status == 404
    again = await (await client.get("/v1/notifications", headers=LA1)).json()
    assert [n["acknowledged"] for n in again["notifications"]] == [False, True, False, False, False]
    la2 = await (await client.get("/v1/notifications", headers=LA2)).json()
    assert {n["localAuthority"]["ods"] for n in la2["notifications"]} == {"LA002"}
    assert nid not in {n["id"] for n in la2["notifications"]}
    assert (await client.get("/v1/notifications?after=!!", headers=LA1)).status == 400
    assert (await client.get("/v1/notifications?limit=0", headers=LA1)).status == 400
    assert (await client.get("/v1/notifications?limit=x", headers=LA1)).status == 400
    assert (await client.get("/v1/notifications?since=1", headers=LA1)).status == 400
    big = await (await client.get("/v1/notifications?limit=5000", headers=LA1)).json()
    assert len(big["notifications"]) == 5
    body = await (await client.get("/v1/admin/deliveries", headers=OPS)).json()
    assert body["channels"]["inbox"]["pending"] == 9  # 10 notifications, one acknowledged
    audit = await app[REDIS].lrange(app[KEYS].system_audit, 0, -1)
    actions = [orjson.loads(a)["action"] for a in audit]
    assert "notifications.read" in actions and "notifications.ack" in actions and "admin.deliveries.read" in actions


async def test_the_access_step_puts_every_notification_in_the_inbox_and_queues_only_push_las(make_client, receiver):
    """One atomic step per access: each LA's notification is in its pull inbox and indexed under the id the inbox
    serves (computed in Lua, as core.access derives it); only LAs with a push channel get a delivery-queue entry."""
    client = await make_client({"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret}, relays=False)
    app = client.app
    redis, keys = app[REDIS], app[KEYS]
    await flag(app)
    await flag(app, "LA002", "B-1")
    outs = [await access(app, f"q{i}") for i in range(20)]  # 40 ids: every uuid variant nibble is exercised
    queued = await redis.xrange(keys.notify_queue)
    assert [(f["la"], f["aid"]) for _, f in queued] == [("LA001", o.access_id) for o in outs]
    for la, headers in (("LA001", LA1), ("LA002", LA2)):
        inbox = await redis.xrange(keys.inbox(la))
        page = await (await client.get("/v1/notifications", headers=headers)).json()
        assert [n["access"]["id"] for n in page["notifications"]] == [o.access_id for o in outs]
        assert [n["id"] for n in page["notifications"]] == [notification_id(o.access_id, la) for o in outs]
        assert await redis.hgetall(keys.inbox_index(la)) == {
            n["id"]: eid for n, (eid, _) in zip(page["notifications"], inbox, strict=True)
        }
    metrics = app[METRICS].exposition().decode()
    assert 'cpis_deliveries_total{channel="inbox",outcome="delivered"} 40.0' in metrics
    assert not receiver.accepted  # no relay ran: the webhook's notifications wait in the queue


async def test_entries_for_an_la_that_lost_its_webhook_settle_without_sending(make_client, receiver):
    """Queued while LA001 had a webhook; the relay now sees no push channel for it (registry changed): the entry is
    settled and indexed under the inbox's notification id, and nothing is sent."""
    client = await make_client({"LA001": webhook(receiver)}, {"LA001_WEBHOOK_SECRET": receiver.secret}, relays=False)
    app = client.app
    redis, keys = app[REDIS], app[KEYS]
    await flag(app)
    outs = [await access(app, f"w{i}") for i in range(3)]
    assert await redis.xlen(keys.notify_queue) == 3
    await redis.delete(keys.inbox_index("LA001"))  # so the relay's settle is what writes it
    relay = Relay(
        RedisOutbox(redis, keys, app[SCRIPTS]),
        lambda la: (),
        policy=RetryPolicy(0.1, 1.0, 3600),
        config=RelayConfig(consumer="t-lost-webhook"),
        observer=MetricsObserver(app[METRICS]),
    )
    await relay.start()
    try:
        await wait_for_async(lambda: _has(redis.xlen(keys.notify_queue), 0), what="the relay did not settle the queue")
    finally:
        await relay.stop(1.0)
    inbox = await redis.xrange(keys.inbox("LA001"))
    assert await redis.hgetall(keys.inbox_index("LA001")) == {
        notification_id(o.access_id, "LA001"): eid for o, (eid, _) in zip(outs, inbox, strict=True)
    }
    assert not receiver.attempts and await redis.xlen(keys.dead_letters) == 0


async def test_child_accesses_for_an_la_holding_a_record(make_client):
    client = await make_client({})
    app = client.app
    await flag(app, "LA001", "A-1")
    for i in range(27):
        await access(app, f"e{i}")
    r = await client.get(f"/v1/children/{NHS}/accesses", headers=LA1)
    assert r.status == 200
    items = (await r.json())["accesses"]
    assert [a["sourceEventId"] for a in items] == [f"e{i}" for i in range(26, 1, -1)]
    assert set(items[0]) == {"id", "occurredAt", "arrivedAt", "careSetting", "user", "sourceEventId"}
    assert items[0]["careSetting"]["name"] == "Example Hospital Emergency Department"
    inbox = await (await client.get("/v1/notifications?limit=1000", headers=LA1)).json()
    assert inbox["notifications"][-1]["access"]["id"] == items[0]["id"]
    assert (await client.get(f"/v1/children/{NHS}/accesses", headers=LA2)).status == 404
    assert (await client.get("/v1/children/9990000026/accesses", headers=LA1)).status == 404
    assert (await client.get("/v1/children/123/accesses", headers=LA1)).status == 404
    # An ended, no longer visible record still entitles the LA to the history.
    await flag(app, "LA001", "A-1", startDate="2020-01-01", endDate="2020-02-01")
    assert (await client.get(f"/v1/children/{NHS}/accesses", headers=LA1)).status == 200
    audit = [orjson.loads(a) for a in await app[REDIS].lrange(app[KEYS].audit(app[KEYS].tag(NHS)), 0, -1)]
    assert any(a["action"] == "accesses.read" and a["org"] == "LA001" for a in audit)


async def _has(count: Awaitable[int], want: int | None = None) -> bool:
    """A Redis count is non-zero (or exactly ``want``)."""
    n = await count
    return n == want if want is not None else n > 0
