"""CDS Hooks 2.0 shapes: the discovery document and one warning card per visible record (plan type, LA, dates,
both phone numbers; never the NHS number). Pure functions over plain dicts."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

from cpis_bridge.core.records import Record
from cpis_bridge.core.registry import LocalAuthority
from cpis_bridge.fhir.mapping import NHS_NUMBER, PLAN_NAMES

PATIENT_VIEW: Final = "cpis-patient-view"
ENCOUNTER_START: Final = "cpis-encounter-start"
PREFETCH: Final = {"patient": "Patient/{{context.patientId}}"}
SOURCE_LABEL: Final = "CP-IS (Child Protection - Information Sharing)"
SUMMARY_MAX: Final = 139  # CDS Hooks: summary "<140 characters"

SERVICES: Final = {
    PATIENT_VIEW: {
        "hook": "patient-view",
        "title": "Child protection information sharing",
        "description": "Shows a warning when the patient is subject to a child protection plan, is a looked-after "
                       "child, or (pregnant patient) has an unborn child protection plan, with the responsible local "
                       "authority's contacts. Unscheduled care settings record the access and notify the LA.",
        "id": PATIENT_VIEW,
        "prefetch": PREFETCH,
        "usageRequirements": "The NHS number must be on the prefetched Patient's identifier.",
    },
    ENCOUNTER_START: {
        "hook": "encounter-start",
        "title": "Child protection information sharing at arrival",
        "description": "At the start of an unscheduled encounter: warns about child protection plans, records the "
                       "attendance and notifies the responsible local authority.",
        "id": ENCOUNTER_START,
        "prefetch": PREFETCH,
        "usageRequirements": "The NHS number must be on the prefetched Patient's identifier.",
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


def _when(record: Record) -> str:
    end = record.end_date.isoformat() if record.end_date else "no end date (open)"
    return f"Start date: {record.start_date.isoformat()}. End date: {end}."


def card(record: Record, la: LocalAuthority | None) -> dict[str, Any]:
    plan = PLAN_NAMES[record.plan_type]
    la_name = la.name if la is not None else record.la
    summary = f"{plan} - {la_name}"
    if len(summary) > SUMMARY_MAX:
        summary = summary[: SUMMARY_MAX - 1] + "…"
    lines = [f"**{plan}** held by **{la_name}** (ODS {record.la}).", "", _when(record)]
    if record.expected_delivery_date is not None:
        lines.append(f"Expected delivery date: {record.expected_delivery_date.isoformat()}.")
    if la is not None:
        lines += ["", f"Office hours: {la.office_hours_phone}",
                  f"Emergency duty (out of hours): {la.emergency_duty_phone}"]
    lines += ["", "Contact the local authority's children's social care team if you have safeguarding concerns."]
    return {
        "uuid": str(uuid.uuid4()),
        "summary": summary,
        "detail": "\n".join(lines),
        "indicator": "warning",
        "source": {"label": SOURCE_LABEL},
    }


def cards(records: Iterable[Record], las: Mapping[str, LocalAuthority]) -> dict[str, Any]:
    return {"cards": [card(r, las.get(r.la)) for r in records]}
