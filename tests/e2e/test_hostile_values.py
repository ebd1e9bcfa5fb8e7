"""Values that could be stored but not read back: dates and instants are range-checked where they enter (records,
uploads, Encounters), the visibility arithmetic cannot overflow, and a stored item that cannot be rendered (written
as older code could) is skipped by every reader, which goes on past it. Locations are percent-encoded."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote

import pytest

from cpis_bridge.compose import open_services
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import today_london
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.core.records import PlanType, Record, VisibilityWindows
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.web.state import METRICS, REGISTRY, SERVICES
from tests.e2e.test_fhir_api import encounter_body
from tests.support.world import ED, LA1, record

CHILD = "9990000018"
NHS_Q = f"https://fhir.nhs.uk/Id/nhs-number|{CHILD}"
TODAY = today_london()


def _years(day: dt.date, years: int) -> str:
    return day.replace(year=day.year + years, day=min(day.day, 28)).isoformat()


async def assert_cpr07(r: Any, field: str) -> None:
    body = await r.json()
    assert r.status == 422, body
    assert body["code"] == "CPR07" and field in [e["field"] for e in body["errors"]], body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endDate", "9999-12-31"),
        ("deleteDate", "9999-12-31"),
        ("endDate", (TODAY + dt.timedelta(days=5 * 366 + 2)).isoformat()),
        ("dateOfBirth", "1899-12-31"),
        ("dateOfBirth", "0001-01-01"),
        ("startDate", "0001-01-01"),
        ("dateOfBirth", (TODAY + dt.timedelta(days=1)).isoformat()),
        ("startDate", "2026-W02-6"),  # an ISO week date: a real day to fromisoformat, not YYYY-MM-DD
        ("dateOfBirth", "2016-W14-6"),
        ("endDate", "2026-W52-1"),
    ],
)
async def test_record_dates_out_of_range_or_shape_are_cpr07(client: Any, field: str, value: str) -> None:
    r = await client.put("/v1/records/CASE-1", json=record(**{field: value}), headers=LA1)
    await assert_cpr07(r, field)


async def test_expected_delivery_at_most_a_year_ahead_and_plan_dates_five(client: Any) -> None:
    ucpp = {"planType": "UCPP", "expectedDeliveryDate": _years(TODAY, 2)}
    await assert_cpr07(
        await client.put("/v1/records/U-1", json=record("U-1", **ucpp), headers=LA1), "expectedDeliveryDate"
    )
    ok = {
        "planType": "UCPP",
        "expectedDeliveryDate": (TODAY + dt.timedelta(days=200)).isoformat(),
        "endDate": _years(TODAY, 4),
        "deleteDate": _years(TODAY, 4),
    }
    r = await client.put("/v1/records/U-1", json=record("U-1", **ok), headers=LA1)
    assert r.status == 201, await r.text()


async def test_a_bad_date_deep_in_an_upload_rejects_that_record_only(client: Any) -> None:
    records = [record(f"C-{i}", nhs=CHILD) for i in range(1200)]
    records[1100]["endDate"] = "9999-12-31"
    records[1150]["startDate"] = "2026-W02-6"
    body = {"sequence": 1, "mode": "delta", "recordCount": 1200, "records": records}
    r = await client.post("/v1/uploads", json=body, headers=LA1)
    report = await r.json()
    assert r.status == 200, report
    assert report["accepted"] == 1198
    assert [(x["index"], x["code"]) for x in report["rejections"]] == [(1100, "CPR07"), (1150, "CPR07")]


def test_visibility_window_arithmetic_never_overflows() -> None:
    far = Record(
        "LA001",
        "X",
        PlanType.CPP,
        NhsNumber(CHILD),
        dt.date(2016, 4, 2),
        dt.date(2020, 1, 1),
        end_date=dt.date(9999, 12, 31),
        delete_date=dt.date.min,
    )
    assert far.last_visible_day(VisibilityWindows()) == dt.date.min
    assert Record(
        "LA001",
        "X",
        PlanType.CPP,
        NhsNumber(CHILD),
        dt.date(2016, 4, 2),
        dt.date(2020, 1, 1),
        end_date=dt.date(9999, 12, 31),
    ).is_visible(TODAY, VisibilityWindows())


@pytest.mark.parametrize(
    "period",
    [
        {"start": "0001-01-01T00:00:00+01:00"},
        {"start": "9999-12-31T23:59:59-01:00"},
        {"start": "1899-12-31T23:59:59Z"},
        {"start": "2026-01-01T10:00:00Z", "end": "9999-12-31T23:59:59-01:00"},
        {"start": "2026-01-01T10:00:00Z", "end": "2025-12-31T10:00:00Z"},  # ends before it starts
        {"start": "2026-01-01T10:00:00"},  # no timezone
        {"start": "2026"},
        "future",
    ],
)
async def test_encounter_period_out_of_range_is_422(client: Any, period: Any) -> None:
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    if period == "future":  # beyond the allowance for clock skew
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
        period = {"start": soon.isoformat(timespec="seconds")}
    r = await client.post("/fhir/Encounter", json=encounter_body(period=period), headers=ED)
    body = await r.json()
    assert r.status == 422, body
    assert any("Encounter.period" in str(i.get("expression")) for i in body["issue"]), body


async def test_encounter_within_clock_skew_is_accepted(client: Any) -> None:
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)
    r = await client.post("/fhir/Encounter", json=encounter_body(period={"start": soon.isoformat()}), headers=ED)
    assert r.status == 201, await r.text()


@pytest.mark.parametrize("local_id", ["a/b", "Zoë-1", "x y?#%", "😀"])
async def test_location_is_percent_encoded_and_resolves(client: Any, local_id: str) -> None:
    path = "/v1/records/" + quote(local_id, safe="")
    r = await client.put(path, json=record(local_id), headers=LA1)
    assert r.status == 201, await r.text()
    location = r.headers["Location"]
    assert location == path and location.isascii()
    got = await client.get(location, headers=LA1)
    assert got.status == 200 and (await got.json())["localId"] == local_id


async def test_a_poisoned_stored_access_is_skipped_by_every_reader(client: Any, settings: Any) -> None:
    """An access whose instant lies outside the calendar once read back (as older code stored from an Encounter
    of 0001-01-01T00:00:00+01:00), between two good ones: every reader answers and goes past it."""
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    app = client.app
    ed = app[REGISTRY].care_settings["RXX01"]
    ctx = AuditContext(Principal(subject="u1", role=Role.CARE_SETTING, ods="RXX01", name="Dr Test Example"))
    arrivals = [
        dt.datetime(2026, 11, 1, 10, tzinfo=dt.UTC),
        dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        dt.datetime(2026, 11, 2, 10, tzinfo=dt.UTC),
    ]
    for i, arrived in enumerate(arrivals):
        req = LookupRequest(
            nhs=NhsNumber(CHILD), care_setting=ed, kind="encounter", source_event_id=f"s|ev-{i}", arrived_at=arrived
        )
        assert (await app[SERVICES].access.lookup(ctx, req)).status == 1

    r = await client.get("/v1/notifications", params={"limit": "2"}, headers=LA1)
    first = await r.json()
    assert r.status == 200, first
    assert len(first["notifications"]) == 1  # the first; the poisoned second is skipped
    r = await client.get("/v1/notifications", params={"after": first["next"]}, headers=LA1)
    rest = await r.json()
    assert r.status == 200 and len(rest["notifications"]) == 1, rest  # paging went past it to the third
    assert [a["arrivedAt"] for a in rest["notifications"][0]["recentAccesses"]] == [
        "2026-11-02T10:00:00.000Z",
        "2026-11-01T10:00:00.000Z",
    ]

    r = await client.get(f"/v1/children/{CHILD}/accesses", headers=LA1)
    assert r.status == 200 and len((await r.json())["accesses"]) == 2
    r = await client.get("/fhir/AuditEvent", params={"patient:identifier": NHS_Q}, headers=ED)
    assert r.status == 200 and (await r.json())["total"] == 2

    async with open_services(settings) as opened:
        service = opened.retention
        data = await service.export(ctx, NhsNumber(CHILD))
    assert len(data["accesses"]) == 2 and len(data["inboxNotifications"]) == 2
    skipped = app[METRICS].unreadable
    assert skipped.labels("access")._value.get() >= 2 and skipped.labels("notification")._value.get() >= 1


@pytest.mark.parametrize("start", ["0001-01-01T00:00:00+01:00", "1899-12-31T23:59:59Z", "9999-12-31T23:59:59-01:00"])
async def test_cds_prefetched_arrival_out_of_range_is_400(client: Any, start: str) -> None:
    from tests.e2e.test_cds import ES, hook, patient

    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    r = await client.post(
        ES,
        json=hook(
            "encounter-start",
            prefetch={"patient": patient(), "encounter": {"resourceType": "Encounter", "period": {"start": start}}},
        ),
        headers=ED,
    )
    assert r.status == 400, await r.text()


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1899-12-31T00:00:00Z"])
async def test_cds_feedback_timestamp_out_of_range_is_400(client: Any, at: str) -> None:
    body = {
        "feedback": [{"card": "0e6a0f5c-3f1d-4a57-9a4e-6c1b5b1d2a02", "outcome": "accepted", "outcomeTimestamp": at}]
    }
    r = await client.post("/cds-services/cpis-patient-view/feedback", json=body, headers=ED)
    assert r.status == 400, await r.text()


@pytest.mark.parametrize("query", ["from=0001-01-01", "to=9999-12-31", "from=2026-W02-6", "to=1899-12-31"])
async def test_duty_view_date_filters_out_of_range_ask_again(
    aiohttp_client: Any, make_settings: Any, query: str
) -> None:
    from cpis_bridge.app import create_app
    from tests.e2e.test_web_duty import Browser

    browser = Browser(await aiohttp_client(create_app(make_settings())))
    assert (await browser.sign_in()).status in (302, 303)
    r = await browser.request("GET", f"/la/notifications?{query}")
    assert r.status == 200 and "Enter a real date" in await r.text()
