"""Pure FHIR mappings: every shape is R4 (fhir.resources R4B) and conforms to its profile; CDS cards never carry the
NHS number; inbound Encounters are reduced to what is retained."""

from __future__ import annotations

import datetime as dt

import pytest

from cpis_bridge.core.access import Access, Actor
from cpis_bridge.core.errors import ValidationFailed
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.records import PlanType, Record
from cpis_bridge.core.registry import LocalAuthority
from cpis_bridge.fhir import cds
from cpis_bridge.fhir import mapping as m
from cpis_bridge.fhir.encounter import parse_encounter, retained
from tests.e2e.test_profiles import assert_conforms, example

LA = LocalAuthority("LA001", "Example Borough Council Children's Services", "0300 000 0001", "0300 000 0002")
LONG_LA = LocalAuthority("LA009", "An Extremely Long Invented Council Name " * 6, "0300 000 0091", "0300 000 0092")


def rec(plan: PlanType = PlanType.CPP, end: dt.date | None = None, la: str = "LA001") -> Record:
    return Record(la, "CASE-1", plan, NhsNumber("9990000018"), dt.date(2016, 4, 2), dt.date(2026, 1, 10), end_date=end)


@pytest.mark.parametrize("plan", list(PlanType))
@pytest.mark.parametrize("end", [None, dt.date(2026, 5, 1)])
def test_record_shapes_conform(plan, end):
    r = rec(plan, end)
    flag, team = m.flag(r, LA), m.careteam(r, LA, today=dt.date(2026, 6, 1), office_open=True)
    assert_conforms(flag)
    assert_conforms(team)
    assert flag["id"] == m.flag_id(r) and team["status"] == ("active" if end is None else "inactive")
    assert flag["code"]["coding"][0]["code"] == m.PLAN_CODES[plan][0]
    assert_conforms(m.careteam(r, None, today=dt.date(2026, 6, 1), office_open=False))  # an LA not registered
    assert_conforms(m.organization(LA, True))
    assert_conforms(m.organization(LA, False))


@pytest.mark.parametrize(
    "today,status",
    [
        (dt.date(2026, 1, 10), "active"),
        (dt.date(2026, 4, 30), "active"),
        (dt.date(2026, 5, 1), "active"),
        (dt.date(2026, 5, 2), "inactive"),
        (dt.date(2027, 1, 1), "inactive"),
    ],
)
def test_careteam_is_active_while_the_plan_runs_and_inactive_once_ended(today, status):
    team = m.careteam(rec(end=dt.date(2026, 5, 1)), LA, today=today, office_open=True)
    assert team["status"] == status and team["period"] == {"start": "2026-01-10", "end": "2026-05-01"}
    assert m.careteam(rec(), LA, today=dt.date(2030, 1, 1), office_open=True)["status"] == "active"


def purposes(telecom):
    return [(t["extension"][0]["valueCoding"]["code"], t["value"], t["rank"]) for t in telecom]


@pytest.mark.parametrize(
    "office_open,expected",
    [
        (True, [("office-hours", "0300 000 0001", 1), ("emergency-duty", "0300 000 0002", 2)]),
        (False, [("emergency-duty", "0300 000 0002", 1), ("office-hours", "0300 000 0001", 2)]),
    ],
)
def test_careteam_and_organization_rank_the_number_to_ring_now(office_open, expected):
    team = m.careteam(rec(), LA, today=dt.date(2026, 6, 1), office_open=office_open)
    assert team["name"] == LA.name
    assert purposes(team["telecom"]) == expected
    assert all(t["extension"][0]["url"] == m.EXT_CONTACT_PURPOSE and t["system"] == "phone" for t in team["telecom"])
    assert purposes(m.organization(LA, office_open)["telecom"]) == expected


def test_flag_id_is_the_flag_sync_uuid5():
    import uuid

    assert m.flag_id(rec()) == str(uuid.uuid5(uuid.UUID("f7fb2f68-0e89-5007-9105-85edde449734"), "LA001|CASE-1"))


def test_access_shapes_conform_without_optional_parts():
    a = Access("RXX01", "ev-1", dt.datetime(2026, 11, 21, 22, 0, tzinfo=dt.UTC), Actor("sys-1"))
    event = m.audit_event("7b7c6c52-3c1e-5d4f-8a7b-2e6d9c1f4a30", a, "9990000018", {})
    assert_conforms(event)
    assert "period" not in event and event["source"]["observer"]["display"] == "RXX01"
    assert_conforms(m.practitioner_role(a, None))
    bundle = m.searchset("http://x/fhir", "http://x/fhir/AuditEvent", [event], [m.practitioner_role(a, None)])
    assert_conforms(bundle)
    assert bundle["total"] == 1 and [e["search"]["mode"] for e in bundle["entry"]] == ["match", "include"]


def test_cards_name_plan_and_la_never_the_nhs_number():
    today = dt.date(2026, 6, 1)
    out = cds.cards(
        [rec(PlanType.UCPP), rec(la="LA009")], {"LA001": LA, "LA009": LONG_LA}, today=today, open_now={"LA001": True}
    )
    assert len(out["cards"]) == 2
    for card in out["cards"]:
        assert "9990000018" not in str(card) and len(card["summary"]) < 140
        assert card["indicator"] == "warning" and card["source"]["label"]
    assert out["cards"][0]["summary"].startswith("Unborn Child Protection Plan - Example Borough")
    assert "Ring now: **0300 000 0001** (Office hours)" in out["cards"][0]["detail"]
    assert "Ring now: **0300 000 0092** (Emergency duty (out of hours))" in out["cards"][1]["detail"]
    assert cds.cards([], {}, today=today, open_now={}) == {"cards": []}


def test_ended_card_summary_keeps_the_end_date_within_140_characters():
    ended = rec(la="LA009", end=dt.date(2025, 12, 4))
    card = cds.card(ended, LONG_LA, today=dt.date(2026, 6, 1), office_open=False)
    assert card["indicator"] == "info" and len(card["summary"]) <= 139
    assert card["summary"].startswith("Child Protection Plan - An Extremely Long")
    assert card["summary"].endswith("…, ended 4 December 2025")
    visits = [
        Access("RXX01", "e2", dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.UTC), Actor("u")),  # BST from 01:00 UTC
        Access("RXX02", "e1", dt.datetime(2026, 3, 28, 23, 59, tzinfo=dt.UTC), Actor("u")),
    ]
    detail = cds.card(
        ended,
        LONG_LA,
        today=dt.date(2026, 6, 1),
        office_open=False,
        recent=visits,
        care_settings={"RXX01": "Example Hospital Emergency Department"},
    )["detail"]
    assert (
        "Recent unscheduled visits (2, newest first):\n"
        "- Sunday 29 March 2026, 02:30: Example Hospital Emergency Department\n"
        "- Saturday 28 March 2026, 23:59: RXX02"
    ) in detail


def test_encounter_parsing_keeps_only_the_minimal_fields():
    body = example("Encounter-request-example")
    body["period"] = {"start": "2026-11-21"}
    body["reasonCode"] = [{"text": "something clinical"}]
    inbound = parse_encounter(body, test_numbers_only=True)
    assert inbound.arrived_at.tzinfo is not None and inbound.arrived_at.date() == dt.date(2026, 11, 21)
    assert inbound.source_event_id == "https://rxx01.example/Id/attendance|ATT-20261121-0042"
    kept = retained(inbound.minimal, "RXX01")
    assert "reasonCode" not in kept
    assert_conforms({**kept, "id": "x1"})
    with pytest.raises(ValidationFailed) as exc:
        parse_encounter({**body, "identifier": [{"value": "no-system"}]}, test_numbers_only=True)
    assert [e.field for e in exc.value.errors] == ["Encounter.identifier"]
    assert "9990000018" not in str(exc.value.detail)
