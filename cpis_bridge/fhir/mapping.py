"""Pure mappings to the FHIR R4 shapes the care-setting API answers with: record -> CareTeam / Flag, LA ->
Organization, access -> AuditEvent (+ PractitionerRole), searchset Bundles. Plain dicts, no validation (tests do it)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, Final

from cpis_bridge.core.access import Access, instant, uuid4_text
from cpis_bridge.core.principal import SDS_USER_PREFIX
from cpis_bridge.core.records import PlanType, Record
from cpis_bridge.core.registry import LocalAuthority

# -- identifiers and code systems (docs/domain.md "Identifiers and codes in FHIR") ---------------------------------
NHS_NUMBER: Final = "https://fhir.nhs.uk/Id/nhs-number"
ODS_ORG: Final = "https://fhir.nhs.uk/Id/ods-organization-code"
SNOMED: Final = "http://snomed.info/sct"
FLAG_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/flag-category"
CPIS_CATEGORY: Final = "https://fhir.nhs.uk/England/CodeSystem/PatientFlagCategory"
UKCORE_FLAG: Final = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Flag"
ROLE_CLASS: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
SDS_JOB_ROLE: Final = "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode"
SDS_USER_ID: Final = "https://fhir.nhs.uk/Id/sds-user-id"
# Displays of the national RBAC access roles that smartcard (CIS2) sessions carry; other codes go without one.
SDS_JOB_ROLE_DISPLAY: Final = {
    "R8000": "Clinical Practitioner Access Role",
    "R8001": "Nurse Access Role",
    "R8002": "Nurse Manager Access Role",
    "R8003": "Health Professional Access Role",
    "R8004": "Healthcare Student Access Role",
    "R8005": "Biomedical Scientist Access Role",
    "R8006": "Medical Secretary Access Role",
    "R8007": "Clinical Coder Access Role",
    "R8008": "Admin/Clinical Support Access Role",
    "R8009": "Receptionist Access Role",
    "R8010": "Clerical Access Role",
    "R8011": "Clerical Manager Access Role",
    "R8012": "Information Officer Access Role",
    "R8013": "Health Records Manager Access Role",
    "R8014": "Social Worker Access Role",
    "R8015": "Systems Support Access Role",
    "R8016": "Midwife Access Role",
    "R8017": "Midwife Manager Access Role",
    "R8024": "Bank Access Role",
}

# Our own systems and profiles (the same base as the Flag sync's identifier system).
OWN: Final = "https://cpis-bridge.example.org"
RECORD_ID: Final = f"{OWN}/Id/plan-record"
USER_ID: Final = f"{OWN}/Id/user"
PLAN_TYPE: Final = f"{OWN}/CodeSystem/plan-type"
CONTACT_PURPOSE: Final = f"{OWN}/CodeSystem/la-contact-purpose"
PROFILE: Final = f"{OWN}/fhir/StructureDefinition/"
PROFILE_CARETEAM: Final = PROFILE + "CPIS-CareTeam"
PROFILE_FLAG: Final = PROFILE + "CPIS-Flag"
PROFILE_AUDITEVENT: Final = PROFILE + "CPIS-AuditEvent"
PROFILE_ENCOUNTER: Final = PROFILE + "CPIS-Encounter"
PROFILE_ORGANIZATION: Final = PROFILE + "CPIS-Organization"
EXT_CONTACT_PURPOSE: Final = PROFILE + "la-contact-purpose"  # labels each LA phone number (office hours / duty)

# Fixed namespaces: Flag ids are those of the Flag sync (docs/contract.md §5), so one record is one Flag everywhere.
NS_FLAG: Final = uuid.UUID("f7fb2f68-0e89-5007-9105-85edde449734")
NS_CARETEAM: Final = uuid.UUID("6f1c2f4e-8a55-5b7e-9d3a-2b7c0c1d4e10")
NS_PRACTITIONER_ROLE: Final = uuid.UUID("6f1c2f4e-8a55-5b7e-9d3a-2b7c0c1d4e11")

PLAN_CODES: Final = {
    PlanType.CPP: ("342191000000101", "Subject to child protection plan"),
    PlanType.LAC: ("764841000000100", "Looked after child"),
    PlanType.UCPP: ("818901000000100", "Unborn child subject to child protection plan"),
}
PLAN_NAMES: Final = {
    PlanType.CPP: "Child Protection Plan",
    PlanType.LAC: "Looked After Child",
    PlanType.UCPP: "Unborn Child Protection Plan",
}
OFFICE_HOURS: Final = ("office-hours", "Office hours")
EMERGENCY_DUTY: Final = ("emergency-duty", "Emergency duty (out of hours)")

_CATEGORIES: Final = (
    (FLAG_CATEGORY, "safety", "Safety"),
    (CPIS_CATEGORY, "CP-IS", "Child Protection - Information Sharing"),
)


def nhs_identifier(nhs: str) -> dict[str, str]:
    return {"system": NHS_NUMBER, "value": str(nhs)}


def ods_identifier(ods: str) -> dict[str, str]:
    return {"system": ODS_ORG, "value": ods}


def record_key(la: str, local_id: str) -> str:
    return f"{la}|{local_id}"


def flag_id(record: Record) -> str:
    return _flag_id(record_key(record.la, record.local_id))


def careteam_id(record: Record) -> str:
    return _careteam_id(record_key(record.la, record.local_id))


@lru_cache(maxsize=65536)
def _flag_id(key: str) -> str:
    return str(uuid.uuid5(NS_FLAG, key))


@lru_cache(maxsize=65536)
def _careteam_id(key: str) -> str:
    return str(uuid.uuid5(NS_CARETEAM, key))


def plan_concept(plan: PlanType) -> dict[str, Any]:
    """The plan as a CodeableConcept: SNOMED CT plus our plan-type code (UCPP's SNOMED code is provisional)."""
    code, display = PLAN_CODES[plan]
    return {
        "coding": [
            {"system": SNOMED, "code": code, "display": display},
            {"system": PLAN_TYPE, "code": plan.value, "display": PLAN_NAMES[plan]},
        ],
        "text": PLAN_NAMES[plan],
    }


def _period(record: Record) -> dict[str, str]:
    period = {"start": record.start_date.isoformat()}
    if record.end_date is not None:
        period["end"] = record.end_date.isoformat()
    return period


def _la_reference(la: LocalAuthority | None, ods: str) -> dict[str, Any]:
    ref: dict[str, Any] = {"reference": f"Organization/{ods}", "identifier": ods_identifier(ods)}
    if la is not None:
        ref["display"] = la.name
    return ref


def _contact(purpose: tuple[str, str], phone: str) -> dict[str, Any]:
    return {
        "purpose": {
            "coding": [{"system": CONTACT_PURPOSE, "code": purpose[0], "display": purpose[1]}],
            "text": purpose[1],
        },
        "telecom": [{"system": "phone", "value": phone, "use": "work"}],
    }


def _phone(purpose: tuple[str, str], phone: str, rank: int) -> dict[str, Any]:
    return {
        "extension": [
            {
                "url": EXT_CONTACT_PURPOSE,
                "valueCoding": {"system": CONTACT_PURPOSE, "code": purpose[0], "display": purpose[1]},
            }
        ],
        "system": "phone",
        "value": phone,
        "use": "work",
        "rank": rank,
    }


@lru_cache(maxsize=1024)
def _telecom(office_phone: str, emergency_phone: str, office_open: bool) -> list[dict[str, Any]]:
    office, duty = _phone(OFFICE_HOURS, office_phone, 1), _phone(EMERGENCY_DUTY, emergency_phone, 1)
    if office_open:
        duty["rank"] = 2
        return [office, duty]
    office["rank"] = 2
    return [duty, office]


def la_telecom(la: LocalAuthority, office_open: bool) -> list[dict[str, Any]]:
    """Both LA numbers, each labelled by purpose; the one to ring now (office hours while the office is open,
    emergency duty otherwise) has rank 1 and comes first. Shared between responses: never mutate it."""
    return _telecom(la.office_hours_phone, la.emergency_duty_phone, office_open)


def plan_running(record: Record, today: dt.date) -> bool:
    """A visible plan runs until its end date (inclusive, Europe/London days); after it, it has ended."""
    return record.end_date is None or today <= record.end_date


def organization(la: LocalAuthority, office_open: bool) -> dict[str, Any]:
    """The LA as an Organization: name, ODS identifier, office-hours and emergency-duty phones told apart."""
    return {
        "resourceType": "Organization",
        "id": la.ods,
        "meta": {"profile": [PROFILE_ORGANIZATION]},
        "identifier": [ods_identifier(la.ods)],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "govt",
                        "display": "Government",
                    }
                ],
                "text": "Local authority children's services",
            }
        ],
        "name": la.name,
        "telecom": la_telecom(la, office_open),
        "contact": [_contact(OFFICE_HOURS, la.office_hours_phone), _contact(EMERGENCY_DUTY, la.emergency_duty_phone)],
    }


def careteam(record: Record, la: LocalAuthority | None, *, today: dt.date, office_open: bool) -> dict[str, Any]:
    """One visible record as the CareTeam responsible for the child: the LA (its name, both numbers with the one to
    ring now ranked first), the plan, its dates; ``active`` while the plan runs, ``inactive`` once it has ended."""
    la_ref = _la_reference(la, record.la)
    team: dict[str, Any] = {
        "resourceType": "CareTeam",
        "id": careteam_id(record),
        "meta": {"profile": [PROFILE_CARETEAM]},
        "identifier": [{"system": RECORD_ID, "value": record_key(record.la, record.local_id)}],
        "status": "active" if plan_running(record, today) else "inactive",
        "category": [plan_concept(record.plan_type)],
        "name": la.name if la is not None else record.la,
        "subject": {"identifier": nhs_identifier(record.nhs_number)},
        "period": _period(record),
        "participant": [
            {
                "role": [
                    {
                        "coding": [{"system": SNOMED, "code": "224608005", "display": "Social worker"}],
                        "text": "Responsible local authority children's services",
                    }
                ],
                "member": la_ref,
            }
        ],
        "managingOrganization": [la_ref],
    }
    if la is not None:
        team["telecom"] = la_telecom(la, office_open)
    return team


def flag(record: Record, la: LocalAuthority | None) -> dict[str, Any]:
    """One visible record as a UK Core Flag (safety + CP-IS categories, SNOMED plan code, LA as author)."""
    author: dict[str, Any] = {"identifier": ods_identifier(record.la)}
    if la is not None:
        author["display"] = la.name
    return {
        "resourceType": "Flag",
        "id": flag_id(record),
        "meta": {"profile": [UKCORE_FLAG, PROFILE_FLAG]},
        "identifier": [{"system": RECORD_ID, "value": record_key(record.la, record.local_id)}],
        "status": "active",
        "category": [{"coding": [{"system": s, "code": c, "display": d}]} for s, c, d in _CATEGORIES],
        "code": plan_concept(record.plan_type),
        "subject": {"identifier": nhs_identifier(record.nhs_number)},
        "period": _period(record),
        "author": author,
    }


def practitioner_role_id(access: Access) -> str:
    return str(uuid.uuid5(NS_PRACTITIONER_ROLE, f"{access.care_setting}|{access.actor.user_id}"))


def user_identifier(user_id: str | None) -> dict[str, str]:
    """The national SDS user id when the token carried one (recorded as ``sds:<id>``), else our own user system."""
    if user_id and user_id.startswith(SDS_USER_PREFIX):
        return {"system": SDS_USER_ID, "value": user_id[len(SDS_USER_PREFIX) :]}
    return {"system": USER_ID, "value": user_id or "unknown"}


def job_role(code: str) -> dict[str, Any]:
    coding = {"system": SDS_JOB_ROLE, "code": code}
    display = SDS_JOB_ROLE_DISPLAY.get(code)
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def practitioner_role(access: Access, care_setting_name: str | None) -> dict[str, Any]:
    """The accessing user in their care setting (the national _include of AuditEvent's ASSIGNED entity)."""
    org: dict[str, Any] = {"identifier": ods_identifier(access.care_setting)}
    if care_setting_name:
        org["display"] = care_setting_name
    user = user_identifier(access.actor.user_id)
    practitioner: dict[str, Any] = {"identifier": user}
    if access.actor.user_name:
        practitioner["display"] = access.actor.user_name
    out: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": practitioner_role_id(access),
        "identifier": [user],
        "active": True,
        "practitioner": practitioner,
        "organization": org,
    }
    if access.actor.role_code:
        out["code"] = [job_role(access.actor.role_code)]
    return out


def audit_event(
    access_id: str, access: Access, nhs: str, care_settings: Mapping[str, tuple[str, str]], viewer: str | None = None
) -> dict[str, Any]:
    """One unscheduled access as an AuditEvent: when, the care setting (ODS and name), who, which child.

    The TraceID or attendance identifier it was recorded under is shown only to the care setting ``viewer`` that
    sent it: other settings learn who looked and when, never another organisation's own identifiers."""
    cs_name, cs_type = care_settings.get(access.care_setting, (access.care_setting, "UNKNOWN"))
    role_ref = f"PractitionerRole/{practitioner_role_id(access)}"
    who: dict[str, Any] = {"reference": role_ref, "identifier": user_identifier(access.actor.user_id)}
    if access.actor.user_name:
        who["display"] = access.actor.user_name
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "110153",
                    "display": "Source Role ID",
                }
            ]
        },
        "who": who,
        "requestor": True,
    }
    if access.actor.role_code:
        agent["role"] = [job_role(access.actor.role_code)]
    user_entity: dict[str, Any] = {
        "what": {"reference": role_ref},
        "type": {"system": ROLE_CLASS, "code": "ASSIGNED", "display": "assigned entity"},
    }
    if viewer is None or viewer == access.care_setting:
        user_entity["detail"] = [{"type": "sourceEventId", "valueString": access.source_event_id}]
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": access_id,
        "meta": {"profile": [PROFILE_AUDITEVENT]},
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [
            {"system": "http://hl7.org/fhir/restful-interaction", "code": "search-type", "display": "search type"}
        ],
        "action": "R",
        "recorded": instant(access.occurred_at),
        "outcome": "0",
        "purposeOfEvent": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "TREAT",
                        "display": "treatment",
                    }
                ]
            }
        ],
        "agent": [agent],
        "source": {
            "site": cs_type,
            "observer": {"identifier": ods_identifier(access.care_setting), "display": cs_name},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "1",
                    "display": "User Device",
                }
            ],
        },
        "entity": [
            {
                "what": {"identifier": nhs_identifier(nhs)},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                    "display": "Person",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient",
                },
            },
            user_entity,
        ],
    }
    if access.arrived_at is not None:
        event["period"] = {"start": instant(access.arrived_at)}
    return event


def searchset(
    base: str,
    self_url: str,
    matches: Iterable[Mapping[str, Any]],
    includes: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A searchset Bundle: ``total`` counts the matches only; included resources carry search.mode=include."""
    entries: list[dict[str, Any]] = []
    total = 0
    for res in matches:
        total += 1
        entries.append(
            {"fullUrl": f"{base}/{res['resourceType']}/{res['id']}", "resource": res, "search": {"mode": "match"}}
        )
    for res in includes:
        entries.append(
            {"fullUrl": f"{base}/{res['resourceType']}/{res['id']}", "resource": res, "search": {"mode": "include"}}
        )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": uuid4_text(),
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
    }
    if entries:
        bundle["entry"] = entries
    return bundle
