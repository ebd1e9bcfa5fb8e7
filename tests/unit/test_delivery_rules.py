"""Pure delivery rules: the retry schedule, dead-letter decisions, the rendered body, Standard Webhooks signatures,
Retry-After parsing and the FHIR Communication (validated with fhir.resources R4B)."""

from __future__ import annotations

import base64
import datetime as dt

import orjson
import pytest
from fhir.resources.R4B.communication import Communication
from standardwebhooks import Webhook

from cpis_bridge.core.access import SEP, Access, Actor, notification_id
from cpis_bridge.core.backoff import MAX_RETRY_AFTER_S, retry_after_s
from cpis_bridge.core.ports import DeliveryResult, QueueEntry
from cpis_bridge.notify.fhir import communication, communication_id
from cpis_bridge.notify.http import classify
from cpis_bridge.notify.webhook import WebhookSecretError, sign, signing_key
from cpis_bridge.services.delivery import RetryPolicy, decide, render

POLICY = RetryPolicy(first_retry_s=1.0, max_backoff_s=60.0, max_age_s=72 * 3600)
T0 = 1_800_000_000_000


def entry(**kw: object) -> QueueEntry:
    values: dict[str, object] = {"id": f"{T0}-0", "la": "LA001", "ref": "1-0", "first_ms": T0}
    values.update(kw)
    return QueueEntry(**values)  # type: ignore[arg-type]


def test_backoff_starts_within_the_first_retry_doubles_and_caps() -> None:
    for rnd in (0.0, 0.5, 0.999):
        assert 0.5 <= POLICY.backoff(1, rnd) <= 1.0
        assert 1.0 <= POLICY.backoff(2, rnd) <= 2.0
        assert 4.0 <= POLICY.backoff(4, rnd) <= 8.0
        assert 30.0 <= POLICY.backoff(20, rnd) <= 60.0
        assert 30.0 <= POLICY.backoff(500, rnd) <= 60.0


def test_transient_failure_is_retried_with_backoff_and_retry_after() -> None:
    plan = decide(POLICY, entry(), "webhook", DeliveryResult("transient", 500), T0, 0.5)
    assert plan.dead is None and plan.retry is not None
    assert plan.retry.attempt == 1 and plan.retry.channel == "webhook" and plan.due_ms == T0 + 750
    plan = decide(POLICY, entry(attempt=3), "webhook", DeliveryResult("transient", 429, 30.0), T0, 0.5)
    assert plan.due_ms == T0 + 30_000


def test_410_dead_letters_at_once() -> None:
    plan = decide(POLICY, entry(), "webhook", DeliveryResult("gone", 410), T0, 0.5)
    assert plan.retry is None and plan.dead is not None and plan.dead.reason == "gone"


def test_other_4xx_retry_at_the_cap_for_an_hour() -> None:
    plan = decide(POLICY, entry(), "webhook", DeliveryResult("client-error", 400), T0, 0.5)
    assert plan.retry is not None and plan.retry.client_error_since_ms == T0
    assert 54_000 <= plan.due_ms - T0 <= 60_000
    later = T0 + 3_599_000
    plan = decide(POLICY, entry(client_error_since_ms=T0), "webhook", DeliveryResult("client-error", 400), later, 0)
    assert plan.retry is not None
    plan = decide(
        POLICY, entry(client_error_since_ms=T0), "webhook", DeliveryResult("client-error", 400), T0 + 3_600_000, 0
    )
    assert plan.dead is not None and plan.dead.reason == "client-error"
    # a 5xx breaks the run of 4xx answers
    plan = decide(POLICY, entry(client_error_since_ms=T0), "webhook", DeliveryResult("transient", 500), later, 0)
    assert plan.retry is not None and plan.retry.client_error_since_ms == 0


def test_max_age_dead_letters_and_the_last_retry_lands_on_the_deadline() -> None:
    deadline = T0 + 72 * 3600 * 1000
    plan = decide(POLICY, entry(attempt=30), "fhir", DeliveryResult("transient", 503), deadline - 1000, 0.9)
    assert plan.due_ms == deadline
    plan = decide(POLICY, entry(attempt=31), "fhir", DeliveryResult("transient", 503), deadline, 0.9)
    assert plan.dead is not None and plan.dead.reason == "max-age"


def test_classify() -> None:
    assert classify(204, {}).outcome == "delivered"
    assert classify(410, {}).outcome == "gone"
    assert classify(404, {}).outcome == "client-error"
    assert classify(429, {"Retry-After": "7"}) == DeliveryResult("transient", 429, 7.0)
    assert classify(503, {}).outcome == "transient"


def test_retry_after_forms() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC).timestamp()
    assert retry_after_s("120") == 120.0
    assert retry_after_s("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_s("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # in the past: at once
    assert retry_after_s("soon") is None and retry_after_s(None) is None and retry_after_s("") is None
    assert retry_after_s("-5") is None and retry_after_s("inf") is None and retry_after_s("nan") is None


def test_retry_after_is_capped_at_an_hour_in_both_forms() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC).timestamp()
    assert retry_after_s("86400") == MAX_RETRY_AFTER_S == 3600.0
    assert retry_after_s("Sat, 03 Jan 2026 12:00:00 GMT", now) == MAX_RETRY_AFTER_S
    assert classify(503, {"Retry-After": "999999"}).retry_after_s == MAX_RETRY_AFTER_S


def fields() -> dict[str, str]:
    a1 = Access(
        "RXX01",
        "ev-1",
        dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC),
        Actor("u1", "Dr A", "R8000"),
        arrived_at=dt.datetime(2026, 3, 1, 8, 55, tzinfo=dt.UTC),
    )
    a0 = Access("RXX02", "ev-0", dt.datetime(2026, 2, 1, 9, 0, tzinfo=dt.UTC), Actor("sys"))
    return {
        "nhs": "9990000018",
        "tag": "abc123",
        "acc": a1.encode(),
        "recent": a1.encode() + "\x1e" + a0.encode(),
        "recs": '[{"localId":"A-1","planType":"CPP","startDate":"2026-01-10","endDate":null}]',
        "cs": orjson.dumps({"RXX01": f"Example ED{SEP}ED", "RXX02": f"Example UTC{SEP}UTC"}).decode(),
        "at": "1772355600123",
    }


def test_render_is_deterministic_and_shaped_per_api() -> None:
    f = fields()
    one, two = render("LA001", f), render("LA001", dict(f))
    assert one.encode() == two.encode()
    body = one.body
    assert body["id"] == notification_id(body["access"]["id"], "LA001") == one.id
    assert body["createdAt"] == "2026-03-01T09:00:00.123Z"
    assert body["access"] == {
        "id": body["access"]["id"],
        "occurredAt": "2026-03-01T09:00:00.000Z",
        "arrivedAt": "2026-03-01T08:55:00.000Z",
        "careSetting": {"ods": "RXX01", "name": "Example ED", "type": "ED"},
        "user": {"id": "u1", "name": "Dr A", "roleCode": "R8000"},
        "sourceEventId": "ev-1",
    }
    assert [a["sourceEventId"] for a in body["recentAccesses"]] == ["ev-1", "ev-0"]
    assert body["recentAccesses"][1]["user"] == {"id": "sys", "name": None, "roleCode": None}
    assert render("LA002", f).id != one.id


def test_signature_verifies_with_the_standardwebhooks_library() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    body = b'{"id":"n1"}'
    ts = int(dt.datetime.now(dt.UTC).timestamp())
    headers = {
        "webhook-id": "n1",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(signing_key(secret), "n1", ts, body),
    }
    assert Webhook(secret).verify(body, headers) == {"id": "n1"}
    with pytest.raises(WebhookSecretError):
        signing_key("not-a-secret")


def test_communication_is_valid_r4() -> None:
    body = render("LA001", fields()).encode()
    nid = orjson.loads(body)["id"]
    resource = communication("LA001", nid, "9990000018", body, "2026-03-01T09:00:00.123Z")
    comm = Communication.model_validate(resource)
    assert comm.id == communication_id(nid) and comm.status == "completed"
    assert comm.subject.identifier.system == "https://fhir.nhs.uk/Id/nhs-number"
    assert comm.recipient[0].identifier.system == "https://fhir.nhs.uk/Id/ods-organization-code"
    assert base64.b64decode(resource["payload"][0]["contentAttachment"]["data"]) == body
