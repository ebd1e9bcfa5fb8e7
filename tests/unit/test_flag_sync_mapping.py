"""Pure parts of the Flag sync: ids, the record -> Flag mapping (valid R4B), status, throttling headers, outcomes."""

from __future__ import annotations

import datetime as dt
import email.utils

import pytest
from fhir.resources.R4B.flag import Flag

from cpis_bridge.core.backoff import retry_after_s
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.records import PlanType, Record, VisibilityWindows
from cpis_bridge.fhir.client import ratelimit_reset_s
from cpis_bridge.fhir.flag_server import classify, read_capabilities
from cpis_bridge.fhir.flag_sync import conditional_url, flag_id, flag_status, record_flag, summary


def rec(plan: PlanType = PlanType.CPP, end: dt.date | None = None, lid: str = "CASE-1") -> Record:
    return Record(
        la="LA001",
        local_id=lid,
        plan_type=plan,
        nhs_number=NhsNumber("9990000018"),
        date_of_birth=dt.date(2016, 4, 2),
        start_date=dt.date(2026, 1, 10),
        end_date=end,
        given_name="Testchild",
        family_name="Example",
    )


def test_flag_id_is_a_stable_uuid5():
    assert flag_id("LA001", "CASE-1") == "1d7e1d30-e819-5bd2-993b-7770a74f86de"  # never changes (README)
    assert flag_id("LA001", "CASE-1") == flag_id("LA001", "CASE-1")
    assert flag_id("LA001", "CASE-1") != flag_id("LA002", "CASE-1")
    assert flag_id("LA001", "CASE-1")[14] == "5"  # version 5


@pytest.mark.parametrize(
    "plan,code",
    [(PlanType.CPP, "342191000000101"), (PlanType.LAC, "764841000000100"), (PlanType.UCPP, "818901000000100")],
)
def test_record_flag_is_valid_r4_and_carries_no_name(plan, code):
    flag = record_flag(rec(plan, end=dt.date(2026, 2, 1)), "active")
    Flag.model_validate(flag)
    assert flag["code"]["coding"][0]["code"] == code
    assert "Testchild" not in str(flag) and "Example" not in str(flag).replace("example.org", "")
    assert flag == record_flag(rec(plan, end=dt.date(2026, 2, 1)), "active"), "pure"


def test_status_follows_visibility():
    windows = VisibilityWindows(364, 28)
    ucpp = rec(PlanType.UCPP, end=dt.date(2026, 2, 1))
    assert flag_status(ucpp, dt.date(2026, 3, 1), windows) == "active"
    assert flag_status(ucpp, dt.date(2026, 3, 2), windows) == "inactive"


def test_conditional_url_encodes_the_key():
    url = conditional_url("LA001", "A B|C")
    assert url.startswith("Flag?identifier=https%3A%2F%2F") and "%7CLA001%7CA%20B%7CC" in url


def test_summary_detects_period_drift():
    a = record_flag(rec(end=dt.date(2026, 2, 1)), "active")
    b = record_flag(rec(), "active")
    assert summary(a) != summary(b)


def test_retry_after_and_ratelimit_parsing():
    assert retry_after_s("3") == 3.0
    when = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_s(when, now=1_000_000) == pytest.approx(30, abs=1)
    assert retry_after_s("soon") is None
    assert ratelimit_reset_s({"RateLimit": '"default";r=0;t=7'}) == 7.0
    assert ratelimit_reset_s({"RateLimit": "limit=10, remaining=0, reset=4"}) == 4.0
    assert ratelimit_reset_s({"RateLimit-Reset": "2"}) == 2.0
    assert ratelimit_reset_s({}) is None


@pytest.mark.parametrize(
    "status,outcome",
    [
        (200, "ok"),
        (201, "ok"),
        (204, "ok"),
        (408, "retry"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
        (409, "conflict"),
        (412, "conflict"),
        (400, "dead"),
        (404, "dead"),
        (422, "dead"),
    ],
)
def test_classify(status, outcome):
    assert classify(status, None, {}).outcome == outcome


def test_classify_multiple_matches_is_dead_and_keeps_outcome():
    body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "multiple-matches"}]}
    result = classify(412, body, {})
    assert result.outcome == "dead" and "multiple-matches" in (result.operation_outcome or "")
    assert classify(429, None, {"Retry-After": "5"}).retry_after_s == 5.0
    assert classify(503, None, {"Retry-After": "86400"}).retry_after_s == 3600.0  # the one cap, as for delivery


def test_read_capabilities():
    caps = read_capabilities(
        {
            "fhirVersion": "4.0.1",
            "rest": [
                {
                    "mode": "server",
                    "interaction": [{"code": "batch"}],
                    "resource": [{"type": "Flag", "interaction": [{"code": "update"}], "updateCreate": True}],
                }
            ],
        }
    )
    assert caps.r4 and caps.update and caps.update_create and caps.batch and not caps.conditional_update
