"""Inbound attendance notifications: validate an R4 Encounter (fhir.resources R4B plus our rules) and reduce it to the
minimal Encounter that is retained (identifier, status, class, subject.identifier, period, the care setting)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Final

from fhir.resources.R4B.encounter import Encounter
from pydantic import ValidationError

from cpis_bridge.core.clock import LONDON
from cpis_bridge.core.errors import FieldError, ValidationFailed
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.fhir.mapping import NHS_NUMBER, PROFILE_ENCOUNTER, ods_identifier

STATUSES: Final = frozenset(
    {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown"}
)
MAX_IDENTIFIER: Final = 120
MAX_AHEAD: Final = dt.timedelta(minutes=5)  # an arrival later than this is a wrong clock or a wrong date, not news
AHEAD_MESSAGE: Final = "the arrival time must not be more than 5 minutes in the future"
_FIELD_NAMES: Final = {"class_fhir": "class"}
_SAFE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_:.\-]{0,63}")
_DIGITS: Final = re.compile(r"\d{6,}")


def safe_name(name: str) -> str:
    """A client-chosen element name fit to echo: never a run of digits (it could be an NHS number)."""
    return name if _SAFE_NAME.fullmatch(name) and not _DIGITS.search(name) else "(unrecognised element)"


@dataclass(frozen=True, slots=True)
class InboundEncounter:
    """What an attendance notification tells us, already validated."""

    source_event_id: str  # "system|value" of the Encounter's identifier
    nhs: NhsNumber
    arrived_at: dt.datetime
    minimal: dict[str, Any]  # the Encounter as retained, without id (the access id) and care setting


def _path(loc: tuple[int | str, ...]) -> str:
    out = "Encounter"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += "." + safe_name(_FIELD_NAMES.get(part, part).removesuffix("__ext"))
    return out


def _instant(value: object) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=LONDON)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time(), LONDON)
    return None


# The plain shape most senders post, checked by hand: only these elements, each a non-empty token without spaces
# (a display may hold single spaces), a full dateTime with seconds and a zone. Anything else goes through the R4B
# model, so every refusal (and its message) comes from one place; what passes here is valid to the model too.
_TOKEN: Final = re.compile(r"[\x21-\x7e]+")
_TEXT: Final = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
_DATETIME: Final = re.compile(
    r"(?:19|2[0-9])[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{3}|\.[0-9]{6})?(?:Z|[+-](?:0[0-9]|1[0-3]):[0-5][0-9])"
)
_PLAIN_KEYS: Final = frozenset({"resourceType", "status", "identifier", "class", "subject", "period"})


def too_far_ahead(arrived: dt.datetime, now: dt.datetime | None = None) -> bool:
    return arrived > (now or dt.datetime.now(dt.UTC)) + MAX_AHEAD


def _plain_datetime(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or not _DATETIME.fullmatch(value):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:  # e.g. 31 February
        return None


def _plain(body: dict[str, Any], test_numbers_only: bool) -> InboundEncounter | None:
    """The InboundEncounter of a plain, valid body without the model (bench/README.md), else None."""
    if not _PLAIN_KEYS.issuperset(body):
        return None
    status, idents, cls, subject, period = (body.get(k) for k in ("status", "identifier", "class", "subject", "period"))
    if not isinstance(status, str) or status not in STATUSES:
        return None
    if not isinstance(idents, list) or not idents:
        return None
    for i in idents:
        if (
            not isinstance(i, dict)
            or i.keys() != {"system", "value"}
            or not isinstance(i["system"], str)
            or not isinstance(i["value"], str)
            or not _TOKEN.fullmatch(i["system"])
            or not _TOKEN.fullmatch(i["value"])
        ):
            return None
    system, value = idents[0]["system"], idents[0]["value"]
    if len(system) + len(value) > MAX_IDENTIFIER:
        return None
    if not isinstance(cls, dict) or "code" not in cls or not {"system", "code", "display"}.issuperset(cls):
        return None
    for k, v in cls.items():
        if not isinstance(v, str) or not (_TEXT if k == "display" else _TOKEN).fullmatch(v):
            return None
    if not isinstance(subject, dict) or subject.keys() != {"identifier"}:
        return None
    sid = subject["identifier"]
    if (
        not isinstance(sid, dict)
        or sid.keys() != {"system", "value"}
        or sid["system"] != NHS_NUMBER
        or not isinstance(sid["value"], str)
    ):
        return None
    if not isinstance(period, dict) or "start" not in period or not {"start", "end"}.issuperset(period):
        return None
    arrived = _plain_datetime(period["start"])
    if arrived is None or ("end" in period and _plain_datetime(period["end"]) is None) or too_far_ahead(arrived):
        return None  # the model path refuses it with the reason
    try:
        nhs = NhsNumber.parse(sid["value"], test_range_only=test_numbers_only)
    except InvalidNhsNumber:
        return None
    klass = {k: cls[k] for k in ("system", "code", "display") if k in cls}
    minimal = {
        "resourceType": "Encounter",
        "meta": {"profile": [PROFILE_ENCOUNTER]},
        "identifier": [{"system": system, "value": value}],
        "status": status,
        "class": klass,
        "subject": {"identifier": {"system": NHS_NUMBER, "value": str(nhs)}},
        "period": {k: v for k, v in period.items() if k in ("start", "end")},
    }
    return InboundEncounter(f"{system}|{value}", nhs, arrived, minimal)


# An attendance happens between 1900 and now (plus MAX_AHEAD for clock skew); an instant outside that is a sender's
# error, and one near the ends of the calendar could not even be turned back into a date when read.
EARLIEST_INSTANT: Final = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)


def instant_problem(value: dt.datetime, now: dt.datetime | None = None) -> str | None:
    """Why an attendance instant (timezone-aware) is out of range, or None."""
    if value < EARLIEST_INSTANT:
        return "must be on or after 1900-01-01"
    if too_far_ahead(value, now):
        return "must not be more than 5 minutes in the future"
    return None


def _period_instant(value: object) -> dt.datetime | None:
    """A period bound as sent: a dateTime with a timezone, or a whole date (the Europe/London day's start)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=LONDON) if len(value) == 10 else None
    return parsed


def period_problems(period: dict[str, Any], now: dt.datetime) -> list[FieldError]:
    """What is wrong with the retained period's bounds: each within 1900..now + clock skew, end not before start."""
    problems: list[FieldError] = []
    bounds: dict[str, dt.datetime] = {}
    for key in ("start", "end"):
        if key not in period:
            continue
        field = f"Encounter.period.{key}"
        value = _period_instant(period[key])
        problem = "must be a date or a dateTime with a timezone" if value is None else instant_problem(value, now)
        if problem is not None:
            problems.append(FieldError(field, problem))
        elif value is not None:
            bounds[key] = value
    if "start" in bounds and "end" in bounds and bounds["end"] < bounds["start"]:
        problems.append(FieldError("Encounter.period.end", "must not be before period.start"))
    return problems


def parse_encounter(body: object, *, test_numbers_only: bool, now: dt.datetime | None = None) -> InboundEncounter:
    """Validate an untrusted Encounter; raises ValidationFailed naming each offending field (FHIRPath)."""
    inbound = _parse_encounter(body, test_numbers_only)
    problems = period_problems(inbound.minimal["period"], now or dt.datetime.now(dt.UTC))
    if problems:
        raise ValidationFailed(
            "the Encounter's period is out of range: " + ", ".join(p.field for p in problems), errors=problems
        )
    return inbound


def _parse_encounter(body: object, test_numbers_only: bool) -> InboundEncounter:
    if isinstance(body, dict) and body.get("resourceType") == "Encounter":
        plain = _plain(body, test_numbers_only)
        if plain is not None:
            return plain
    if not isinstance(body, dict) or body.get("resourceType") != "Encounter":
        raise ValidationFailed(
            "the body must be an R4 Encounter resource",
            errors=[FieldError("Encounter.resourceType", "must be Encounter")],
        )
    try:
        model = Encounter.model_validate(body)
    except ValidationError as exc:
        errors = [FieldError(_path(tuple(e["loc"])), str(e["msg"])[:200]) for e in exc.errors()[:10]]
        raise ValidationFailed(
            "the Encounter is not valid FHIR R4: " + ", ".join(e.field for e in errors), errors=errors
        ) from None
    problems: list[FieldError] = []
    if model.status not in STATUSES:
        problems.append(FieldError("Encounter.status", "must be an Encounter status code"))
    ident = next((i for i in model.identifier or [] if i.system and i.value), None)
    if ident is None:
        problems.append(FieldError("Encounter.identifier", "an identifier with system and value is required"))
    elif len(ident.system or "") + len(ident.value or "") > MAX_IDENTIFIER:
        problems.append(
            FieldError("Encounter.identifier", f"system and value together must be at most {MAX_IDENTIFIER} characters")
        )
    subject_ident = model.subject.identifier if model.subject is not None else None
    nhs: NhsNumber | None = None
    if subject_ident is None or subject_ident.system != NHS_NUMBER:
        problems.append(
            FieldError("Encounter.subject.identifier", f"an identifier with system {NHS_NUMBER} is required")
        )
    else:
        try:
            nhs = NhsNumber.parse(subject_ident.value, test_range_only=test_numbers_only)
        except InvalidNhsNumber as exc:
            problems.append(FieldError("Encounter.subject.identifier.value", str(exc)))
    arrived = _instant(model.period.start) if model.period is not None else None
    raw_period = body["period"] if isinstance(body.get("period"), dict) else {}
    # pydantic would read a JSON number as epoch seconds, and the period is kept as sent: a dateTime must be a string
    not_text = [key for key in ("start", "end") if key in raw_period and not isinstance(raw_period[key], str)]
    problems += [FieldError(f"Encounter.period.{key}", "must be a FHIR dateTime string") for key in not_text]
    if arrived is None and "start" not in not_text:
        problems.append(FieldError("Encounter.period.start", "the arrival time is required"))
    elif arrived is not None and too_far_ahead(arrived):
        problems.append(FieldError("Encounter.period.start", AHEAD_MESSAGE))
    if model.class_fhir is None or not model.class_fhir.code:
        problems.append(FieldError("Encounter.class", "a class code is required (e.g. v3-ActCode EMER)"))
    if problems:
        raise ValidationFailed("the Encounter is incomplete: " + ", ".join(p.field for p in problems), errors=problems)
    assert ident is not None and nhs is not None and arrived is not None and model.period is not None
    cls = model.class_fhir
    assert cls is not None
    klass = {k: v for k, v in (("system", cls.system), ("code", cls.code), ("display", cls.display)) if v}
    period = {k: v for k, v in body["period"].items() if k in ("start", "end")}
    minimal = {
        "resourceType": "Encounter",
        "meta": {"profile": [PROFILE_ENCOUNTER]},
        "identifier": [{"system": ident.system, "value": ident.value}],
        "status": model.status,
        "class": klass,
        "subject": {"identifier": {"system": NHS_NUMBER, "value": str(nhs)}},
        "period": period,
    }
    return InboundEncounter(f"{ident.system}|{ident.value}", nhs, arrived, minimal)


def retained(minimal: dict[str, Any], care_setting: str) -> dict[str, Any]:
    """The minimal Encounter with the care setting that sent it (serviceProvider by ODS code)."""
    return {**minimal, "serviceProvider": {"identifier": ods_identifier(care_setting)}}


def with_id(stored: dict[str, Any], encounter_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": encounter_id,
        **{k: v for k, v in stored.items() if k not in ("resourceType", "id")},
    }


def care_setting_of(stored: dict[str, Any]) -> str | None:
    value = ((stored.get("serviceProvider") or {}).get("identifier") or {}).get("value")
    return value if isinstance(value, str) else None
