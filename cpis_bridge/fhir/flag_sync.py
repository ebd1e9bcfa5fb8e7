"""The Flag a record is mirrored as on the sync server (API.md section 5): ids, identifier, status, and the pure
record -> Flag mapping. No I/O here."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Final

from cpis_bridge.core.records import PlanType, Record, VisibilityWindows

#: The fixed UUIDv5 namespace of Flag ids (documented in the README); uuid5(NAMESPACE_URL, ".../fhir/Flag").
FLAG_NAMESPACE: Final = uuid.UUID("f7fb2f68-0e89-5007-9105-85edde449734")
#: The identifier system of our Flags; its value is the readable key "<LA ODS>|<localId>".
IDENTIFIER_SYSTEM: Final = "https://cpis-bridge.example.org/Id/plan-record"
PLAN_TYPE_SYSTEM: Final = "https://cpis-bridge.example.org/CodeSystem/plan-type"
NHS_NUMBER_SYSTEM: Final = "https://fhir.nhs.uk/Id/nhs-number"
ODS_ORG_SYSTEM: Final = "https://fhir.nhs.uk/Id/ods-organization-code"
UKCORE_FLAG: Final = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Flag"
SNOMED: Final = "http://snomed.info/sct"

ACTIVE: Final = "active"
INACTIVE: Final = "inactive"
ENTERED_IN_ERROR: Final = "entered-in-error"

_CATEGORY: Final = [
    {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "safety",
                 "display": "Safety"}]},
    {"coding": [{"system": "https://fhir.nhs.uk/England/CodeSystem/PatientFlagCategory", "code": "CP-IS",
                 "display": "Child Protection - Information Sharing"}]},
]
_CODES: Final = {
    PlanType.CPP: ("342191000000101", "Subject to child protection plan"),
    PlanType.LAC: ("764841000000100", "Looked after child"),
    PlanType.UCPP: ("818901000000100", "Unborn child subject to child protection plan"),
}


def record_key(la: str, local_id: str) -> str:
    """The readable key: the identifier value, the sync schedule member and the record hash field."""
    return f"{la}|{local_id}"


def flag_id(la: str, local_id: str) -> str:
    """UUIDv5 of (LA ODS code, localId) under FLAG_NAMESPACE."""
    return str(uuid.uuid5(FLAG_NAMESPACE, record_key(la, local_id)))


def flag_status(record: Record, day: dt.date, windows: VisibilityWindows) -> str:
    """active while the record is visible on ``day``, inactive after (erasure is decided by the caller)."""
    return ACTIVE if record.is_visible(day, windows) else INACTIVE


def plan_code(plan: PlanType) -> dict[str, Any]:
    code, display = _CODES[plan]
    coding = [{"system": SNOMED, "code": code, "display": display}]
    if plan is PlanType.UCPP:  # provisional SNOMED code: also carry the local code (DOMAIN.md)
        coding.append({"system": PLAN_TYPE_SYSTEM, "code": "UCPP", "display": display})
    return {"coding": coding, "text": display}


def record_flag(record: Record, status: str) -> dict[str, Any]:
    """The R4 Flag (plain JSON dict) for ``record`` with ``status``. Pure: same input, same output."""
    period: dict[str, str] = {"start": record.start_date.isoformat()}
    if record.end_date is not None:
        period["end"] = record.end_date.isoformat()
    return {
        "resourceType": "Flag",
        "id": flag_id(record.la, record.local_id),
        "meta": {"profile": [UKCORE_FLAG]},
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": record_key(record.la, record.local_id)}],
        "status": status,
        "category": [dict(c, coding=[dict(x) for x in c["coding"]]) for c in _CATEGORY],
        "code": plan_code(record.plan_type),
        "subject": {"identifier": {"system": NHS_NUMBER_SYSTEM, "value": str(record.nhs_number)}},
        "period": period,
        "author": {"identifier": {"system": ODS_ORG_SYSTEM, "value": record.la}},
    }


def conditional_url(la: str, local_id: str) -> str:
    """The conditional-update target ``Flag?identifier=system|value`` (URL-encoded value)."""
    from urllib.parse import quote

    return f"Flag?identifier={quote(IDENTIFIER_SYSTEM, safe='')}%7C{quote(record_key(la, local_id), safe='')}"


def summary(flag: dict[str, Any]) -> tuple[Any, ...]:
    """What reconcile compares between the store's Flag and the server's: status, period, subject, code, author."""
    period = flag.get("period") or {}
    subject = ((flag.get("subject") or {}).get("identifier") or {}).get("value")
    codes = tuple(sorted(c.get("code", "") for c in (flag.get("code") or {}).get("coding", [])))
    author = ((flag.get("author") or {}).get("identifier") or {}).get("value")
    return (flag.get("status"), period.get("start"), period.get("end"), subject, codes, author)


def our_key(flag: dict[str, Any]) -> str | None:
    """The readable key of a server Flag carrying our identifier system, else None."""
    for ident in flag.get("identifier") or []:
        if ident.get("system") == IDENTIFIER_SYSTEM and isinstance(ident.get("value"), str):
            return str(ident["value"])
    return None
