"""The fast validation path agrees with the full checks: same accept/reject, same Record, same problems."""

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from cpis_bridge.core.errors import ValidationFailed
from cpis_bridge.core.nhs import check_digit
from cpis_bridge.core.records import (
    READ_ONLY_FIELDS,
    WRITABLE_FIELDS,
    parse_record,
    parse_record_full,
    parse_valid_record,
)

TODAY = dt.date(2026, 11, 22)
MISSING = object()


def _valid_number(prefix: str, n: int) -> str:
    for k in range(n, n + 20):
        nine = f"{prefix}{k % 10 ** (9 - len(prefix)):0{9 - len(prefix)}d}"
        cd = check_digit(nine)
        if cd is not None:
            return nine + str(cd)
    raise AssertionError("no valid number")


iso_dates = st.dates(dt.date(1990, 1, 1), dt.date(2027, 12, 31))
dates = st.one_of(
    iso_dates.map(dt.date.isoformat),
    iso_dates.map(dt.date.isoformat),
    st.none(),
    st.just(""),
    st.just("2026-02-30"),
    st.just("2026-W01-1"),
    st.just(" 2026-01-01"),
    iso_dates.map(lambda d: d.strftime("%Y%m%d")),
    st.text(max_size=12),
    st.integers(),
    st.just(MISSING),
)
numbers = st.one_of(
    st.integers(0, 99_999).map(lambda n: _valid_number("999", n * 10)),
    st.integers(0, 99_999).map(lambda n: _valid_number("999", n * 10)),
    st.integers(0, 99_999).map(lambda n: _valid_number("401", n * 10)),
    st.integers(0, 10**10 - 1).map(lambda n: f"{n:010d}"),
    st.just("999 000 0018"),
    st.just("999-000-0018"),
    st.just("\u0669\u0669\u0669\u0660\u0660\u0660\u0660\u0660\u0661\u0668"),
    st.just("9990000018 "),
    st.integers(),
    st.none(),
    st.text(max_size=12),
    st.just(MISSING),
)
texts = st.one_of(
    st.none(),
    st.just(""),
    st.just("  "),
    st.just(" Testchild "),
    st.text(max_size=110),
    st.text(min_size=95, max_size=105),
    st.sampled_from(["C2", "s31", "x\x00y", "a\u200bb", "\u00e9l\u00e8ve"]),
    st.integers(),
    st.just(MISSING),
)
local_ids = st.one_of(
    st.from_regex(r"[A-Z]{1,3}-[0-9]{1,8}", fullmatch=True),
    st.text(max_size=70),
    st.just(" C-1"),
    st.just(""),
    st.just("C-\x00"),
    st.just("C-\u2028"),
    st.just("C-1 "),
    st.just("x" * 64),
    st.just("x" * 65),
    st.integers(),
    st.none(),
    st.just(MISSING),
)
plans = st.sampled_from(["CPP", "LAC", "UCPP", "cpp", "", None, 1, MISSING])
extras = st.dictionaries(
    st.one_of(st.sampled_from(sorted(READ_ONLY_FIELDS)), st.text(max_size=8)),
    st.one_of(st.none(), st.integers(), st.text(max_size=5)),
    max_size=2,
)


good_dates = st.one_of(
    st.dates(dt.date(2000, 1, 1), dt.date(2026, 12, 31)),
    st.dates(TODAY - dt.timedelta(days=3), TODAY + dt.timedelta(days=3)),
).map(dt.date.isoformat)
good_optional_dates = st.one_of(st.none(), st.just(""), st.just(MISSING), good_dates)
good_texts = st.one_of(st.none(), st.just(""), st.just(MISSING), st.text(max_size=40), st.just(" Testchild "))
WIDE = {
    "localId": local_ids,
    "planType": plans,
    "nhsNumber": numbers,
    "dateOfBirth": dates,
    "startDate": dates,
    "endDate": dates,
    "deleteDate": dates,
    "expectedDeliveryDate": dates,
    "givenName": texts,
    "familyName": texts,
    "lacLegalBasis": texts,
}


@st.composite
def bodies(draw: st.DrawFn) -> object:
    """Mostly near-valid records (every field plausible, then up to three fields drawn from a wide range)."""
    fields = {
        "localId": draw(
            st.one_of(
                st.from_regex(r"[A-Z]{1,3}-[0-9]{1,8}", fullmatch=True),
                st.sampled_from(["C-\x00", "C-1 ", " C-1", "x" * 65, "x" * 64, "C\u00e91"]),
            )
        ),
        "planType": draw(st.sampled_from(["CPP", "LAC", "UCPP"])),
        "nhsNumber": draw(st.one_of(st.just("9990000018"), st.just("4010232137"), numbers)),
        "dateOfBirth": draw(good_dates),
        "startDate": draw(good_dates),
        "endDate": draw(good_optional_dates),
        "deleteDate": draw(good_optional_dates),
        "expectedDeliveryDate": draw(st.one_of(st.just(MISSING), st.none(), good_dates)),
        "givenName": draw(good_texts),
        "familyName": draw(good_texts),
        "lacLegalBasis": draw(st.one_of(st.just(MISSING), st.none(), st.just("C2"), good_texts)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(WIDE)), max_size=3, unique=True)):
        fields[name] = draw(WIDE[name])
    body = {k: v for k, v in fields.items() if v is not MISSING}
    if draw(st.integers(0, 4)) == 0:
        body.update(draw(extras))
    return draw(st.one_of(st.just(body), st.just(body), st.just(body), st.just([body]), st.none()))


def _outcome(fn, raw, **kw):  # type: ignore[no-untyped-def]
    try:
        return ("ok", fn(raw, la="LA001", today=TODAY, **kw))
    except ValidationFailed as exc:
        return ("rejected", exc.code, exc.detail, exc.errors)


@settings(max_examples=1000, deadline=None)
@given(bodies(), st.booleans(), st.sampled_from([None, "C-1", "ABC-12"]))
def test_fast_path_agrees_with_full_checks(raw: object, test_only: bool, path_id: str | None) -> None:
    kw = {"test_numbers_only": test_only, "local_id": path_id}
    full = _outcome(parse_record_full, raw, **kw)
    fast = parse_valid_record(raw, la="LA001", today=TODAY, **kw)
    if fast is not None:
        assert full == ("ok", fast)
        assert type(fast.nhs_number) is type(full[1].nhs_number)
    assert _outcome(parse_record, raw, **kw) == full


def test_common_shapes_take_the_fast_path() -> None:
    base = {
        "localId": "UP-0000001",
        "planType": "CPP",
        "nhsNumber": "9990000018",
        "dateOfBirth": "2016-04-02",
        "givenName": "Testchild",
        "familyName": "Example",
        "startDate": "2026-01-10",
        "endDate": None,
        "deleteDate": None,
        "expectedDeliveryDate": None,
        "lacLegalBasis": None,
        "version": 3,
        "updatedAt": "2026-01-10T10:00:00.000Z",
        "visible": True,
    }
    shapes = [
        base,
        {**base, "planType": "LAC", "lacLegalBasis": "C2", "endDate": "2026-09-01"},
        {**base, "planType": "UCPP", "expectedDeliveryDate": "2027-01-01", "givenName": ""},
    ]
    for raw in shapes:
        record = parse_valid_record(raw, la="LA001", today=TODAY, test_numbers_only=True)
        assert record is not None
        assert record == parse_record_full(raw, la="LA001", today=TODAY, test_numbers_only=True)
    assert (
        parse_valid_record({**base, "nhsNumber": "9990000019"}, la="LA001", today=TODAY, test_numbers_only=True) is None
    )
    assert set(base) <= WRITABLE_FIELDS | READ_ONLY_FIELDS
