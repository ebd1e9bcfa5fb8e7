"""The CapabilityStatement, built from the interactions the router actually serves (each FHIR handler declares its
resource type, interaction, search parameters and includes; web/fhir.py collects them from the router)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from cpis_bridge.fhir.mapping import PROFILE

SOFTWARE_NAME: Final = "cpis-bridge"
CAPABILITY_URL: Final = PROFILE.replace("StructureDefinition/", "CapabilityStatement/cpis-bridge")
SECURITY_SERVICE: Final = "http://terminology.hl7.org/CodeSystem/restful-security-service"


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    type: str
    documentation: str


@dataclass(frozen=True, slots=True)
class Interaction:
    """One FHIR interaction served by a route (``code`` is a restful interaction: read, search-type, create)."""

    resource: str
    code: str
    profile: str | None = None
    params: tuple[SearchParam, ...] = ()
    includes: tuple[str, ...] = ()
    documentation: str = ""
    supported_profiles: tuple[str, ...] = ()


def capability_statement(
    interactions: Iterable[Interaction], *, version: str, date: str, base_url: str | None = None
) -> dict[str, Any]:
    by_type: dict[str, list[Interaction]] = {}
    for it in interactions:
        by_type.setdefault(it.resource, []).append(it)
    resources = []
    for rtype in sorted(by_type):
        its = sorted(by_type[rtype], key=lambda i: i.code)
        res: dict[str, Any] = {"type": rtype}
        profile = next((i.profile for i in its if i.profile), None)
        if profile:
            res["profile"] = profile
        supported = sorted({p for i in its for p in i.supported_profiles})
        if supported:
            res["supportedProfile"] = supported
        res["interaction"] = [
            {"code": i.code, **({"documentation": i.documentation} if i.documentation else {})} for i in its
        ]
        includes = list(dict.fromkeys(inc for i in its for inc in i.includes))  # as declared: the canonical first
        if includes:
            res["searchInclude"] = includes
        params = {p.name: p for i in its for p in i.params}
        if params:
            res["searchParam"] = [
                {"name": p.name, "type": p.type, "documentation": p.documentation}
                for p in sorted(params.values(), key=lambda p: p.name)
            ]
        resources.append(res)
    implementation: dict[str, Any] = {"description": "cpis-bridge care-setting FHIR API (child protection flags)"}
    if base_url:
        implementation["url"] = base_url
    return {
        "resourceType": "CapabilityStatement",
        "id": "cpis-bridge",
        "url": CAPABILITY_URL,
        "version": version,
        "name": "CpisBridgeCareSettingApi",
        "title": "cpis-bridge care-setting FHIR API",
        "status": "active",
        "date": date,
        "publisher": "cpis-bridge",
        "kind": "instance",
        "software": {"name": SOFTWARE_NAME, "version": version},
        "implementation": implementation,
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml", "json", "xml"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Strict search handling: unknown search parameters are rejected with 400. Header "
                "IsUnscheduledAccessEvent (or IsUnscheduledEvent): true|false (omitted = true) on "
                "CareTeam and Flag searches; headers TraceID and X-Correlation-ID are echoed, TraceID "
                "and NHSD-Session-URID audited. _format (json, xml or a FHIR mime type) wins over "
                "Accept; a format not served is a 406. Errors carry the UK Core Spine error code in "
                "issue.details.",
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {"system": SECURITY_SERVICE, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"},
                                {"system": SECURITY_SERVICE, "code": "OAuth", "display": "OAuth"},
                            ]
                        }
                    ],
                    "description": "OAuth 2.0 bearer JWT (RFC 6750; care-setting role) on every interaction except "
                    "metadata; a 401 carries WWW-Authenticate: Bearer. Optional claims: name, role_code "
                    "(SDS job role), sds_user_id (the national SDS user id).",
                },
                "resource": resources,
            }
        ],
    }
