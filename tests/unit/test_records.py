"""Record validation (CPR04/CPR07) and the visibility windows of docs/domain.md."""

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpis_bridge.core.clock import today_london
from cpis_bridge.core.codes import FileCode, file_code
from cpis_bridge.core.errors import ValidationFailed
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.records import PlanType, Record, VisibilityWindows, parse_record

TODAY = dt.date(2026, 11, 22)
W = VisibilityWindows()


def make(
    plan: PlanType = PlanType.CPP,
    start: dt.date = dt.date(2026, 1, 1),
    end: dt.date | None = None,
    delete: dt.date | None = None,
) -> Record:
    return Record(
        "LA001", "X", plan, NhsNumber("9990000018"), dt.date(2016, 1, 1), start, end_date=end, delete_date=delete
    )


def body(**kw):
    b = {
        "localId": "C-1",
        "planType": "CPP",
        "nhsNumber": "9990000018",
        "dateOfBirth": "2016-04-02",
        "startDate": "2026-01-10",
    }
    b.update(kw)
    return b


def parse(b, **kw):
    return parse_record(b, la="LA001", today=TODAY, test_numbers_only=True, **kw)


def test_open_plan_visible_from_start() -> None:
    r = make()
    assert not r.is_visible(dt.date(2025, 12, 31), W)
    assert r.is_visible(dt.date(2026, 1, 1), W) and r.is_visible(dt.date(2040, 1, 1), W)
    assert r.last_visible_day(W) is None


@pytest.mark.parametrize(("plan", "window"), [(PlanType.CPP, 364), (PlanType.LAC, 364), (PlanType.UCPP, 28)])
def test_ended_plan_window(plan: PlanType, window: int) -> None:
    end = dt.date(2026, 3, 1)
    r = make(plan, end=end)
    assert r.is_visible(end + dt.timedelta(days=window), W)
    assert not r.is_visible(end + dt.timedelta(days=window + 1), W)


def test_delete_date_hides_from_that_day_whichever_first() -> None:
    r = make(end=dt.date(2026, 3, 1), delete=dt.date(2026, 4, 1))
    assert r.is_visible(dt.date(2026, 3, 31), W) and not r.is_visible(dt.date(2026, 4, 1), W)
    assert r.last_visible_day(W) == dt.date(2026, 3, 31)
    r2 = make(end=dt.date(2026, 3, 1), delete=dt.date(2030, 1, 1))
    assert r2.last_visible_day(W) == dt.date(2027, 2, 28)


def test_windows_are_configurable() -> None:
    r = make(PlanType.UCPP, end=dt.date(2026, 3, 1))
    assert r.is_visible(dt.date(2026, 3, 20), VisibilityWindows(364, 28))
    assert not r.is_visible(dt.date(2026, 3, 20), VisibilityWindows(364, 7))


@given(
    st.dates(dt.date(2020, 1, 1), dt.date(2030, 1, 1)),
    st.integers(0, 800),
    st.dates(dt.date(2019, 1, 1), dt.date(2032, 1, 1)),
)
def test_visibility_matches_last_visible_day(start: dt.date, length: int, day: dt.date) -> None:
    r = make(start=start, end=start + dt.timedelta(days=length))
    last = r.last_visible_day(W)
    assert last is not None
    assert r.is_visible(day, W) == (start <= day <= last)


def test_london_day_boundary() -> None:
    # 23:30 UTC in British Summer Time is already the next day in London.
    assert today_london(dt.datetime(2026, 7, 1, 23, 30, tzinfo=dt.UTC)) == dt.date(2026, 7, 2)
    assert today_london(dt.datetime(2026, 12, 1, 23, 30, tzinfo=dt.UTC)) == dt.date(2026, 12, 1)


def test_valid_record_parses() -> None:
    r = parse(body(lacLegalBasis=None, givenName=" Testchild "))
    assert r.local_id == "C-1" and r.given_name == "Testchild" and r.plan_type is PlanType.CPP


def test_nhs_number_errors_are_cpr04_and_never_echo_the_number() -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse(body(nhsNumber="9990000019"))
    assert exc.value.code == "CPR04" and "9990000019" not in exc.value.detail
    with pytest.raises(ValidationFailed) as exc:
        parse(body(nhsNumber="9434765919"))
    assert exc.value.code == "CPR04"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"planType": "XYZ"}, "planType"),
        ({"startDate": "2026-13-01"}, "startDate"),
        ({"startDate": "2027-01-01"}, "startDate"),
        ({"startDate": None}, "startDate"),
        ({"endDate": "2025-01-01"}, "endDate"),
        ({"deleteDate": "2025-01-01"}, "deleteDate"),
        ({"expectedDeliveryDate": "2026-06-01"}, "expectedDeliveryDate"),
        ({"lacLegalBasis": "s31"}, "lacLegalBasis"),
        ({"dateOfBirth": "2030-01-01"}, "dateOfBirth"),
        ({"reason": "anything"}, "reason"),
        ({"localId": ""}, "localId"),
        ({"givenName": "x" * 101}, "givenName"),
    ],
)
def test_field_errors_are_cpr07_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse(body(**change))
    assert exc.value.code == "CPR07"
    assert field in [e.field for e in exc.value.errors]


def test_plan_specific_fields_allowed_on_their_plan() -> None:
    assert parse(body(planType="UCPP", expectedDeliveryDate="2027-01-01")).expected_delivery_date
    assert parse(body(planType="LAC", lacLegalBasis="C2")).lac_legal_basis == "C2"


def test_path_local_id_must_match_body() -> None:
    with pytest.raises(ValidationFailed):
        parse(body(localId="OTHER"), local_id="C-1")
    assert parse(body(localId=None), local_id="C-1").local_id == "C-1"


def test_compact_round_trip() -> None:
    r = parse(body(planType="UCPP", expectedDeliveryDate="2027-01-01", endDate="2026-05-01"))
    assert Record.from_compact("LA001", "C-1", r.to_compact()) == r


def test_file_codes() -> None:
    assert file_code(3, 0) is FileCode.ALL_UPLOADED
    assert file_code(3, 1) is FileCode.PARTIAL
    assert file_code(0, 2) is FileCode.NONE_UPLOADED
