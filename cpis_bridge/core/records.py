"""Plan records uploaded by local authorities: the value, its validation (CPR codes) and when it is visible."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from typing import Any, Final

from cpis_bridge.core.codes import RecordCode
from cpis_bridge.core.errors import Problems, ValidationFailed
from cpis_bridge.core.nhs import TEST_RANGE_PREFIX, InvalidNhsNumber, NhsNumber, check_digit

MAX_LOCAL_ID: Final = 64
MAX_NAME: Final = 100
MAX_LEGAL_BASIS: Final = 32
# The range a date may take (a value outside it is a typing error, and one near the ends of the calendar would
# overflow the visibility arithmetic and every reader): nothing before 1900; births and plan starts not in the
# future; plan ends and delete dates at most PLAN_YEARS_AHEAD years ahead; an expected delivery at most a year ahead.
EARLIEST_DATE: Final = dt.date(1900, 1, 1)
PLAN_YEARS_AHEAD: Final = 5
DELIVERY_YEARS_AHEAD: Final = 1

# Fields a client may send; the read-only ones are accepted (a GET result can be PUT back) and ignored.
WRITABLE_FIELDS: Final = frozenset(
    {
        "localId",
        "planType",
        "nhsNumber",
        "dateOfBirth",
        "givenName",
        "familyName",
        "startDate",
        "endDate",
        "deleteDate",
        "expectedDeliveryDate",
        "lacLegalBasis",
    }
)
READ_ONLY_FIELDS: Final = frozenset({"version", "updatedAt", "visible"})


class PlanType(StrEnum):
    CPP = "CPP"
    LAC = "LAC"
    UCPP = "UCPP"


@dataclass(frozen=True, slots=True)
class VisibilityWindows:
    """How long an ended plan stays visible (docs/domain.md, configurable)."""

    after_end_days: int = 364
    ucpp_after_end_days: int = 28

    def for_plan(self, plan: PlanType) -> int:
        return self.ucpp_after_end_days if plan is PlanType.UCPP else self.after_end_days


@dataclass(frozen=True, slots=True)
class Record:
    """One plan, identified by (la, local_id). Holds status, dates and identity only: never a reason or notes."""

    la: str
    local_id: str
    plan_type: PlanType
    nhs_number: NhsNumber
    date_of_birth: dt.date
    start_date: dt.date
    given_name: str | None = None
    family_name: str | None = None
    end_date: dt.date | None = None
    delete_date: dt.date | None = None
    expected_delivery_date: dt.date | None = None
    lac_legal_basis: str | None = None
    version: int = 0
    updated_at: dt.datetime | None = None

    # -- visibility -------------------------------------------------------------------------------------------
    def last_visible_day(self, windows: VisibilityWindows) -> dt.date | None:
        """The last day the record is visible, or None while it stays visible indefinitely (open, no delete date)."""
        last: dt.date | None = None
        if self.end_date is not None:
            try:
                last = self.end_date + dt.timedelta(days=windows.for_plan(self.plan_type))
            except OverflowError:  # validation keeps dates far from the calendar's end; never fail a reader on one
                last = dt.date.max
        if self.delete_date is not None:
            before_delete = self.delete_date - dt.timedelta(days=1) if self.delete_date > dt.date.min else dt.date.min
            last = before_delete if last is None else min(last, before_delete)
        return last

    def is_visible(self, day: dt.date, windows: VisibilityWindows) -> bool:
        if day < self.start_date:
            return False
        last = self.last_visible_day(windows)
        return last is None or day <= last

    # -- shapes -----------------------------------------------------------------------------------------------
    def with_meta(self, version: int, updated_at: dt.datetime) -> Record:
        return replace(self, version=version, updated_at=updated_at)

    def to_api(self, *, visible: bool) -> dict[str, Any]:
        """The record as docs/contract.md §4 returns it."""
        return {
            "localId": self.local_id,
            "planType": self.plan_type.value,
            "nhsNumber": str(self.nhs_number),
            "dateOfBirth": self.date_of_birth.isoformat(),
            "givenName": self.given_name,
            "familyName": self.family_name,
            "startDate": self.start_date.isoformat(),
            "endDate": _iso(self.end_date),
            "deleteDate": _iso(self.delete_date),
            "expectedDeliveryDate": _iso(self.expected_delivery_date),
            "lacLegalBasis": self.lac_legal_basis,
            "version": self.version,
            "updatedAt": _instant(self.updated_at),
            "visible": visible,
        }

    def to_compact(self) -> dict[str, Any]:
        """The stored form: short keys, nulls omitted (memory matters at national scale). Lua reads p, s, e, d."""
        d: dict[str, Any] = {
            "p": self.plan_type.value,
            "n": str(self.nhs_number),
            "b": self.date_of_birth.isoformat(),
            "s": self.start_date.isoformat(),
            "v": self.version,
        }
        for key, value in (
            ("g", self.given_name),
            ("f", self.family_name),
            ("e", _iso(self.end_date)),
            ("d", _iso(self.delete_date)),
            ("x", _iso(self.expected_delivery_date)),
            ("l", self.lac_legal_basis),
            ("u", _instant(self.updated_at)),
        ):
            if value is not None:
                d[key] = value
        return d

    @classmethod
    def from_compact(cls, la: str, local_id: str, d: dict[str, Any]) -> Record:
        return cls(
            la=la,
            local_id=local_id,
            plan_type=PlanType(d["p"]),
            nhs_number=NhsNumber(d["n"]),
            date_of_birth=dt.date.fromisoformat(d["b"]),
            start_date=dt.date.fromisoformat(d["s"]),
            given_name=d.get("g"),
            family_name=d.get("f"),
            end_date=_date_or_none(d.get("e")),
            delete_date=_date_or_none(d.get("d")),
            expected_delivery_date=_date_or_none(d.get("x")),
            lac_legal_basis=d.get("l"),
            version=int(d.get("v", 0)),
            updated_at=dt.datetime.fromisoformat(d["u"]) if d.get("u") else None,
        )


def _iso(d: dt.date | None) -> str | None:
    return None if d is None else d.isoformat()


def _instant(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _date_or_none(s: str | None) -> dt.date | None:
    return None if s is None else dt.date.fromisoformat(s)


# -- validation of untrusted input ----------------------------------------------------------------------------


def _parse_date(raw: dict[str, Any], name: str, problems: Problems, *, required: bool) -> dt.date | None:
    value = raw.get(name)
    if value is None or value == "":
        if required:
            problems.add(name, "is required (YYYY-MM-DD)")
        return None
    if not isinstance(value, str) or not _DATE_SHAPE.fullmatch(value):
        problems.add(name, "must be a date YYYY-MM-DD")
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        problems.add(name, "must be a real calendar date YYYY-MM-DD")
        return None
    if day < EARLIEST_DATE:
        problems.add(name, f"must be on or after {EARLIEST_DATE.isoformat()}")
        return None
    return day


_DATE_SHAPE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _years_after(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def parse_day(value: str, today: dt.date) -> dt.date:
    """A day given by a person or a query (a search filter): YYYY-MM-DD, from 1900 to PLAN_YEARS_AHEAD years ahead;
    ValueError otherwise (so the day arithmetic that follows cannot overflow)."""
    if not _DATE_SHAPE.fullmatch(value):
        raise ValueError("not YYYY-MM-DD")
    day = dt.date.fromisoformat(value)
    if not EARLIEST_DATE <= day <= latest_dates(today)[0]:
        raise ValueError("out of range")
    return day


@lru_cache(maxsize=4)
def latest_dates(today: dt.date) -> tuple[dt.date, dt.date]:
    """The latest end or delete date and the latest expected delivery date accepted on ``today``."""
    return _years_after(today, PLAN_YEARS_AHEAD), _years_after(today, DELIVERY_YEARS_AHEAD)


def _parse_text(raw: dict[str, Any], name: str, problems: Problems, max_len: int) -> str | None:
    value = raw.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.add(name, "must be a string")
        return None
    value = value.strip()
    if len(value) > max_len:
        problems.add(name, f"must be at most {max_len} characters")
        return None
    if not value.isprintable():
        problems.add(name, "must not contain control characters")
        return None
    return value or None


def validate_local_id(value: object) -> str:
    """A local id as given in a path or body; raises ValidationFailed (CPR07)."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed("localId is required", code=RecordCode.VALIDATION_FAILED)
    if len(value) > MAX_LOCAL_ID or not value.isprintable() or value != value.strip():
        raise ValidationFailed(
            f"localId must be 1-{MAX_LOCAL_ID} printable characters without surrounding spaces",
            code=RecordCode.VALIDATION_FAILED,
        )
    return value


_KNOWN_FIELDS: Final = WRITABLE_FIELDS | READ_ONLY_FIELDS
_PLANS: Final = {p.value: p for p in PlanType}
_fromisoformat: Final = dt.date.fromisoformat


class _NotFast(Exception):
    """Something about the record needs the full checks (raised and caught inside :func:`parse_valid_record`)."""


def _fast_date(value: object) -> dt.date | None:
    """An optional date in the accepted shape (None when absent); _NotFast when the full checks must decide."""
    if value is None or value == "":
        return None
    # with ASCII and dashes at 4 and 7 fromisoformat accepts YYYY-MM-DD only (not week dates such as 2026-W02-6)
    if type(value) is not str or len(value) != 10 or value[4] != "-" or value[7] != "-" or not value.isascii():
        raise _NotFast
    try:
        day = _fromisoformat(value)
    except ValueError:
        raise _NotFast from None
    if day < EARLIEST_DATE:
        raise _NotFast
    return day


def _fast_text(value: object, max_len: int) -> str | None:
    """An optional text field as :func:`_parse_text` accepts it; _NotFast when the full checks must decide."""
    if value is None or value == "":
        return None
    if type(value) is not str:
        raise _NotFast
    value = value.strip()
    if len(value) > max_len or not value.isprintable():
        raise _NotFast
    return value or None


def parse_valid_record(
    raw: object,
    *,
    la: str,
    today: dt.date,
    test_numbers_only: bool,
    local_id: str | None = None,
) -> Record | None:
    """The fast path of :func:`parse_record` for a record without any problem: the same Record, or None whenever
    anything is off (then :func:`parse_record`'s full checks decide and name every problem). Builds no Problems."""
    if type(raw) is not dict or not raw.keys() <= _KNOWN_FIELDS:
        return None
    lid = raw.get("localId")
    if local_id is not None:
        if lid is not None and lid != local_id:
            return None
        lid = local_id
    if type(lid) is not str or not 0 < len(lid) <= MAX_LOCAL_ID or not lid.isprintable() or lid != lid.strip():
        return None
    nhs = raw.get("nhsNumber")
    if (
        type(nhs) is not str
        or len(nhs) != 10
        or not nhs.isascii()
        or not nhs.isdigit()
        or check_digit(nhs[:9]) != ord(nhs[9]) - 48
        or (test_numbers_only and not nhs.startswith(TEST_RANGE_PREFIX))
    ):
        return None
    plan_text = raw.get("planType")
    plan = _PLANS.get(plan_text) if type(plan_text) is str else None
    if plan is None:
        return None
    try:
        dob = _fast_date(raw.get("dateOfBirth"))
        start = _fast_date(raw.get("startDate"))
        end = _fast_date(raw.get("endDate"))
        delete = _fast_date(raw.get("deleteDate"))
        edd = _fast_date(raw.get("expectedDeliveryDate"))
        given = _fast_text(raw.get("givenName"), MAX_NAME)
        family = _fast_text(raw.get("familyName"), MAX_NAME)
        legal = _fast_text(raw.get("lacLegalBasis"), MAX_LEGAL_BASIS)
    except _NotFast:
        return None
    latest_plan, latest_delivery = latest_dates(today)
    if (
        dob is None
        or start is None
        or dob > today
        or start > today
        or (end is not None and (end < start or end > latest_plan))
        or (delete is not None and (delete < start or delete > latest_plan))
        or (edd is not None and (plan is not PlanType.UCPP or edd > latest_delivery))
        or (legal is not None and plan is not PlanType.LAC)
    ):
        return None
    return Record(
        la=la,
        local_id=lid,
        plan_type=plan,
        nhs_number=NhsNumber(nhs),
        date_of_birth=dob,
        start_date=start,
        given_name=given,
        family_name=family,
        end_date=end,
        delete_date=delete,
        expected_delivery_date=edd,
        lac_legal_basis=legal,
    )


def parse_record(
    raw: object,
    *,
    la: str,
    today: dt.date,
    test_numbers_only: bool,
    local_id: str | None = None,
) -> Record:
    """Validate an untrusted record body into a :class:`Record` for ``la``.

    Raises ValidationFailed with code CPR04 (NHS number) or CPR07 (any other field), listing every field problem.
    ``local_id`` (from a URL path) wins over the body's and must agree with it when both are given.
    A valid record takes the fast path (:func:`parse_valid_record`); anything else gets the full checks.
    """
    record = parse_valid_record(raw, la=la, today=today, test_numbers_only=test_numbers_only, local_id=local_id)
    if record is not None:
        return record
    return parse_record_full(raw, la=la, today=today, test_numbers_only=test_numbers_only, local_id=local_id)


def parse_record_full(
    raw: object,
    *,
    la: str,
    today: dt.date,
    test_numbers_only: bool,
    local_id: str | None = None,
) -> Record:
    """:func:`parse_record` without the fast path: every check, every problem named."""
    if not isinstance(raw, dict):
        raise ValidationFailed("a record must be a JSON object", code=RecordCode.VALIDATION_FAILED)
    problems = Problems()
    unknown = sorted(k for k in raw if k not in WRITABLE_FIELDS and k not in READ_ONLY_FIELDS)
    for name in unknown[:10]:
        problems.add(str(name)[:40], "is not a recognised field (only status, dates and identity are held)")

    body_id = raw.get("localId")
    if local_id is not None and body_id not in (None, local_id):
        problems.add("localId", "does not match the localId in the path")
    lid_value = local_id if local_id is not None else body_id
    try:
        lid = validate_local_id(lid_value)
    except ValidationFailed as exc:
        problems.add("localId", exc.detail)
        lid = ""

    nhs: NhsNumber | None = None
    nhs_error = False
    try:
        nhs = NhsNumber.parse(raw.get("nhsNumber"), test_range_only=test_numbers_only)
    except InvalidNhsNumber as exc:
        problems.add("nhsNumber", str(exc), RecordCode.NHS_NUMBER_FORMAT)
        nhs_error = True

    plan: PlanType | None = None
    try:
        plan = PlanType(str(raw.get("planType")))
    except ValueError:
        problems.add("planType", "must be one of CPP, LAC, UCPP")

    dob = _parse_date(raw, "dateOfBirth", problems, required=True)
    start = _parse_date(raw, "startDate", problems, required=True)
    end = _parse_date(raw, "endDate", problems, required=False)
    delete = _parse_date(raw, "deleteDate", problems, required=False)
    edd = _parse_date(raw, "expectedDeliveryDate", problems, required=False)
    given = _parse_text(raw, "givenName", problems, MAX_NAME)
    family = _parse_text(raw, "familyName", problems, MAX_NAME)
    legal = _parse_text(raw, "lacLegalBasis", problems, MAX_LEGAL_BASIS)

    if dob is not None and dob > today:
        problems.add("dateOfBirth", "must not be in the future")
    if start is not None:
        if start > today:
            problems.add("startDate", "must not be in the future")
        if end is not None and end < start:
            problems.add("endDate", "must be on or after startDate")
        if delete is not None and delete < start:
            problems.add("deleteDate", "must be on or after startDate")
    latest_plan, latest_delivery = latest_dates(today)
    for name, day in (("endDate", end), ("deleteDate", delete)):
        if day is not None and day > latest_plan:
            problems.add(
                name, f"must be no more than {PLAN_YEARS_AHEAD} years ahead (on or before {latest_plan.isoformat()})"
            )
    if edd is not None and edd > latest_delivery:
        problems.add(
            "expectedDeliveryDate",
            f"must be no more than {DELIVERY_YEARS_AHEAD} year ahead (on or before {latest_delivery.isoformat()})",
        )
    if edd is not None and plan is not None and plan is not PlanType.UCPP:
        problems.add("expectedDeliveryDate", "is only allowed on a UCPP record")
    if legal is not None and plan is not None and plan is not PlanType.LAC:
        problems.add("lacLegalBasis", "is only allowed on a LAC record")

    if problems:
        code = RecordCode.NHS_NUMBER_FORMAT if nhs_error else RecordCode.VALIDATION_FAILED
        summary = "; ".join(f"{e.field} {e.message}" for e in problems.items[:5])
        raise ValidationFailed(summary, code=code, errors=problems.items)
    assert nhs is not None and plan is not None and dob is not None and start is not None
    return Record(
        la=la,
        local_id=lid,
        plan_type=plan,
        nhs_number=nhs,
        date_of_birth=dob,
        start_date=start,
        given_name=given,
        family_name=family,
        end_date=end,
        delete_date=delete,
        expected_delivery_date=edd,
        lac_legal_basis=legal,
    )
