"""CDS Hooks 2.0 shapes: the discovery document, one card per visible record (plan type, LA, whether it has ended,
the number to ring now and the other, the plan's dates, the child's recent unscheduled visits; never the NHS number),
and the clinician a hook call names (``context.userId``, with name and role from a Practitioner(Role) resource).
Pure functions over plain dicts."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cpis_bridge.core.access import Access
from cpis_bridge.core.clock import LONDON
from cpis_bridge.core.records import Record
from cpis_bridge.core.registry import LocalAuthority
from cpis_bridge.fhir.mapping import EMERGENCY_DUTY, NHS_NUMBER, OFFICE_HOURS, PLAN_NAMES, plan_running

PATIENT_VIEW: Final = "cpis-patient-view"
ENCOUNTER_START: Final = "cpis-encounter-start"
PREFETCH: Final = {"patient": "Patient/{{context.patientId}}"}
# optional: a client that sends them saves a fetch; the user names the clinician to the LA, the encounter its start
USER_PREFETCH: Final = {"user": "{{context.userId}}"}
ENCOUNTER_PREFETCH: Final = {"encounter": "Encounter/{{context.encounterId}}"}
SOURCE_LABEL: Final = "CP-IS (Child Protection - Information Sharing)"
SUMMARY_MAX: Final = 139  # CDS Hooks: summary "<140 characters"
USER_ID: Final = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}")
MONTHS: Final = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

SERVICES: Final = {
    PATIENT_VIEW: {
        "hook": "patient-view",
        "title": "Child protection information sharing",
        "description": "Shows a warning when the patient is subject to a child protection plan, is a looked-after "
        "child, or (pregnant patient) has an unborn child protection plan, with the responsible local "
        "authority's contacts. Unscheduled care settings record the access and notify the LA.",
        "id": PATIENT_VIEW,
        "prefetch": {**PREFETCH, **USER_PREFETCH},
        "usageRequirements": "The NHS number must be on the prefetched Patient's identifier. The user prefetch "
        "(optional) names the clinician and their role to the local authority.",
    },
    ENCOUNTER_START: {
        "hook": "encounter-start",
        "title": "Child protection information sharing at arrival",
        "description": "At the start of an unscheduled encounter: warns about child protection plans, records the "
        "attendance and notifies the responsible local authority.",
        "id": ENCOUNTER_START,
        "prefetch": {**PREFETCH, **USER_PREFETCH, **ENCOUNTER_PREFETCH},
        "usageRequirements": "The NHS number must be on the prefetched Patient's identifier. The user prefetch "
        "(optional) names the clinician and their role to the local authority; the encounter "
        "prefetch (optional) gives the arrival time, which may not be more than 5 minutes ahead.",
    },
}


def discovery() -> dict[str, Any]:
    return {"services": [dict(s) for s in SERVICES.values()]}


def nhs_number_of(patient: object) -> str | None:
    """The NHS number on a Patient resource (the identifier with the NHS number system), if any."""
    if not isinstance(patient, dict):
        return None
    identifiers = patient.get("identifier")
    if not isinstance(identifiers, list):
        return None
    for ident in identifiers:
        if isinstance(ident, dict) and ident.get("system") == NHS_NUMBER and isinstance(ident.get("value"), str):
            return str(ident["value"])
    return None


# -- the user the hook call names ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    """The clinician (``context.userId``), with a name and job role code when the EHR told us them."""

    id: str
    name: str | None = None
    role_code: str | None = None


def _text(value: object, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join("".join(c for c in value if c.isprintable()).split())[:limit]
    return text or None


def _human_name(names: object) -> str | None:
    if not isinstance(names, list):
        return None
    for name in names:
        if not isinstance(name, dict):
            continue
        text = _text(name.get("text"), 100)
        if text:
            return text
        parts = [p for p in (name.get("prefix") or []) + (name.get("given") or []) if isinstance(p, str)]
        parts += [name["family"]] if isinstance(name.get("family"), str) else []
        text = _text(" ".join(parts), 100)
        if text:
            return text
    return None


def user_from(user_id: str, resource: object) -> User:
    """The user with name and role from their Practitioner or PractitionerRole resource (ignored unless it is the
    resource ``user_id`` names)."""
    kind, _, rid = user_id.partition("/")
    if not isinstance(resource, dict) or resource.get("resourceType") != kind or resource.get("id") not in (None, rid):
        return User(user_id)
    name: str | None = None
    role: str | None = None
    if kind == "PractitionerRole":
        practitioner = resource.get("practitioner")
        name = _text(practitioner.get("display"), 100) if isinstance(practitioner, dict) else None
        for concept in resource.get("code") or []:
            for coding in (concept.get("coding") or []) if isinstance(concept, dict) else []:
                if role is None and isinstance(coding, dict):
                    role = _text(coding.get("code"), 32)
    else:
        name = _human_name(resource.get("name"))
    return User(user_id, name, role)


# -- cards ----------------------------------------------------------------------------------------------------------


def plain_date(day: dt.date) -> str:
    """4 December 2025 (whatever the process locale)."""
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def plain_instant(at: dt.datetime) -> str:
    """Thursday 4 December 2025, 14:05 (Europe/London)."""
    local = at.astimezone(LONDON)
    return f"{WEEKDAYS[local.weekday()]} {plain_date(local.date())}, {local:%H:%M}"


def _summary(plan: str, la_name: str, ended: dt.date | None) -> str:
    tail = f", ended {plain_date(ended)}" if ended is not None else ""
    room = SUMMARY_MAX - len(plan) - len(" - ") - len(tail)
    if len(la_name) > room:
        la_name = la_name[: room - 1] + "…"
    return f"{plan} - {la_name}{tail}"


def _dates(record: Record, running: bool) -> str:
    start = f"Started {plain_date(record.start_date)}"
    if record.end_date is None:
        return f"{start}; no end date."
    return f"{start}; {'ends' if running else 'ended'} {plain_date(record.end_date)}."


def _visits(recent: Sequence[Access], care_settings: Mapping[str, str]) -> list[str]:
    if not recent:
        return ["No unscheduled visits are recorded."]
    lines = [f"Recent unscheduled visits ({len(recent)}, newest first):"]
    for access in recent:
        where = care_settings.get(access.care_setting, access.care_setting)
        lines.append(f"- {plain_instant(access.occurred_at)}: {where}")
    return lines


def card(
    record: Record,
    la: LocalAuthority | None,
    *,
    today: dt.date,
    office_open: bool,
    recent: Sequence[Access] = (),
    care_settings: Mapping[str, str] | None = None,
    link: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A running plan is a ``warning``; an ended one (still inside its display window) is ``info`` and says when it
    ended. ``care_settings``: ODS code -> name, for where each recent visit was. ``link``: the card's SMART app link
    (the clinician view), when the care setting's EHR can launch it."""
    plan = PLAN_NAMES[record.plan_type]
    la_name = la.name if la is not None else record.la
    running = plan_running(record, today)
    lines = [f"**{plan}** held by **{la_name}** (ODS {record.la}).", "", _dates(record, running)]
    if record.expected_delivery_date is not None:
        lines.append(f"Expected delivery date: {plain_date(record.expected_delivery_date)}.")
    if la is not None:
        now_label, now_phone, other_label, other_phone = (
            (OFFICE_HOURS[1], la.office_hours_phone, EMERGENCY_DUTY[1], la.emergency_duty_phone)
            if office_open
            else (EMERGENCY_DUTY[1], la.emergency_duty_phone, OFFICE_HOURS[1], la.office_hours_phone)
        )
        lines += ["", f"Ring now: **{now_phone}** ({now_label})", f"Other number: {other_phone} ({other_label})"]
    lines += ["", *_visits(recent, care_settings or {})]
    lines += ["", "Contact the local authority's children's social care team if you have safeguarding concerns."]
    out: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "summary": _summary(plan, la_name, None if running else record.end_date),
        "detail": "\n".join(lines),
        "indicator": "warning" if running else "info",
        "source": {"label": SOURCE_LABEL},
    }
    if link is not None:
        out["links"] = [dict(link)]
    return out


def smart_link(url: str, app_context: str) -> dict[str, str]:
    """A CDS Hooks link of type ``smart`` to the clinician view: the EHR launches ``url`` (SMART EHR launch) and
    hands ``app_context`` (an opaque id, never the NHS number) back to us in its token response."""
    return {"label": "Open the CP-IS clinician view", "url": url, "type": "smart", "appContext": app_context}


def cards(
    records: Iterable[Record],
    las: Mapping[str, LocalAuthority],
    *,
    today: dt.date,
    open_now: Mapping[str, bool],
    recent: Sequence[Access] = (),
    care_settings: Mapping[str, str] | None = None,
    link: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``open_now``: LA ODS code -> whether its office is open (which number to ring); ``link`` on every card."""
    return {
        "cards": [
            card(
                r,
                las.get(r.la),
                today=today,
                office_open=open_now.get(r.la, False),
                recent=recent,
                care_settings=care_settings,
                link=link,
            )
            for r in records
        ]
    }
