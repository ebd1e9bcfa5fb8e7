"""Inbound attendance notifications: validate an R4 Encounter (fhir.resources R4B plus our rules) and reduce it to the
minimal Encounter that is retained (identifier, status, class, subject.identifier, period, the care setting)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Final

from fhir.resources.R4B.encounter import Encounter
from pydantic import ValidationError

from cpis_bridge.core.errors import FieldError, ValidationFailed
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.records import LONDON
from cpis_bridge.fhir.mapping import NHS_NUMBER, PROFILE_ENCOUNTER, ods_identifier

STATUSES: Final = frozenset(
    {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown"}
)
MAX_IDENTIFIER: Final = 120
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


def parse_encounter(body: object, *, test_numbers_only: bool) -> InboundEncounter:
    """Validate an untrusted Encounter; raises ValidationFailed naming each offending field (FHIRPath)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Encounter":
        raise ValidationFailed("the body must be an R4 Encounter resource",
                               errors=[FieldError("Encounter.resourceType", "must be Encounter")])
    try:
        model = Encounter.model_validate(body)
    except ValidationError as exc:
        errors = [FieldError(_path(tuple(e["loc"])), str(e["msg"])[:200]) for e in exc.errors()[:10]]
        raise ValidationFailed("the Encounter is not valid FHIR R4: " + ", ".join(e.field for e in errors),
                               errors=errors) from None
    problems: list[FieldError] = []
    if model.status not in STATUSES:
        problems.append(FieldError("Encounter.status", "must be an Encounter status code"))
    ident = next((i for i in model.identifier or [] if i.system and i.value), None)
    if ident is None:
        problems.append(FieldError("Encounter.identifier", "an identifier with system and value is required"))
    elif len(ident.system or "") + len(ident.value or "") > MAX_IDENTIFIER:
        problems.append(FieldError("Encounter.identifier", f"system and value together must be at most "
                                                           f"{MAX_IDENTIFIER} characters"))
    subject_ident = model.subject.identifier if model.subject is not None else None
    nhs: NhsNumber | None = None
    if subject_ident is None or subject_ident.system != NHS_NUMBER:
        problems.append(FieldError("Encounter.subject.identifier", f"an identifier with system {NHS_NUMBER} "
                                                                   "is required"))
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
    if model.class_fhir is None or not model.class_fhir.code:
        problems.append(FieldError("Encounter.class", "a class code is required (e.g. v3-ActCode EMER)"))
    if problems:
        raise ValidationFailed("the Encounter is incomplete: " + ", ".join(p.field for p in problems),
                               errors=problems)
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
    return {"resourceType": "Encounter", "id": encounter_id, **{k: v for k, v in stored.items()
                                                                 if k not in ("resourceType", "id")}}


def care_setting_of(stored: dict[str, Any]) -> str | None:
    value = ((stored.get("serviceProvider") or {}).get("identifier") or {}).get("value")
    return value if isinstance(value, str) else None
