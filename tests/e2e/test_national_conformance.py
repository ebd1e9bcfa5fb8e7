"""A client written to NHS England's CP-IS FHIR API consumer guide, given only cpis-bridge's base URL and a token: the
guide's example requests exactly as it sends them (paths, `patient:identifier`, `Authorization`, `TraceID`,
`IsUnscheduledAccessEvent`, includes, error cases), every answer checked element by element against the national data
mapping, once in JSON and once in FHIR XML. Where cpis-bridge deliberately differs, the README's table
"national CP-IS FHIR API / cpis-bridge" says so and why; nothing here relies on a difference."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from cpis_bridge.core.principal import Role
from tests.e2e.test_fhir_api import accesses, from_xml, inbox, put
from tests.support.world import LA1, auth

pytestmark = pytest.mark.no_relays  # the LA's inbox is inspected

NHS_NUMBER = "https://fhir.nhs.uk/Id/nhs-number"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
SDS_USER = "https://fhir.nhs.uk/Id/sds-user-id"
SDS_ROLE = "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode"
SPINE = "https://fhir.hl7.org.uk/CodeSystem/UKCore-SpineErrorOrWarningCode"
CHILD = "9990000018"
NO_RECORD = "9990000026"
MEDIA = {"json": "application/fhir+json", "xml": "application/fhir+xml"}
# a smartcard user at the emergency department, as the national guide's examples assume
SMARTCARD = auth(
    Role.CARE_SETTING, "RXX01", name="Dr Test Example", role_code="R8000", extra={"sds_user_id": "555000000018"}
)


@pytest.fixture(params=["json", "xml"])
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def guide_headers(token: dict[str, str] | None = SMARTCARD, unscheduled: str | None = "true") -> dict[str, str]:
    """The request headers of the guide's examples: Authorization, TraceID (a UUID), IsUnscheduledAccessEvent."""
    headers = {"TraceID": str(uuid.uuid4()), **(token or {})}
    if unscheduled is not None:
        headers["IsUnscheduledAccessEvent"] = unscheduled
    return headers


async def call(client: Any, fmt: str, path: str, headers: dict[str, str], status: int = 200) -> dict[str, Any]:
    """GET as the national client does, asking for ``fmt``; checks the response headers the guide lists."""
    r = await client.get(path, headers={**headers, "Accept": MEDIA[fmt]})
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == MEDIA[fmt] and r.headers.get("Date")
    if "TraceID" in headers:
        assert r.headers["TraceID"] == headers["TraceID"]
    if fmt == "xml":
        return from_xml(text)
    body: dict[str, Any] = await r.json(content_type=None)
    return body


def search(resource: str, nhs: str = CHILD, extra: str = "") -> str:
    return f"/fhir/{resource}?patient:identifier={NHS_NUMBER}|{nhs}{extra}"


def matches(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    found = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    assert bundle["total"] == len(found)
    assert all(
        e["resource"]["resourceType"] == kind and e["fullUrl"].endswith(f"/{kind}/{e['resource']['id']}") for e in found
    )
    return [e["resource"] for e in found]


def included(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "include" and e["resource"]["resourceType"] == kind
    ]


def national_error(outcome: dict[str, Any], code: str) -> None:
    assert outcome["resourceType"] == "OperationOutcome"
    [issue] = outcome["issue"]
    assert issue["severity"] == "error"
    [coding] = issue["details"]["coding"]
    assert (coding["system"], coding["code"]) == (SPINE, code) and coding["display"]
    assert CHILD not in str(outcome)


# -- Use case: Get CareTeam -------------------------------------------------------------------------------------------


async def test_get_careteam_success(client, fmt):
    await put(client, startDate="2026-01-10")
    bundle = await call(client, fmt, search("CareTeam"), guide_headers())
    [team] = matches(bundle, "CareTeam")
    # the national mapping, element by element
    assert team["status"] == "active"
    assert team["subject"]["identifier"] == {"system": NHS_NUMBER, "value": CHILD}
    assert {"system": "http://snomed.info/sct", "code": "342191000000101"}.items() <= team["category"][0]["coding"][
        0
    ].items()
    assert team["name"] == "Example Borough Council Children's Services"  # the LA
    assert team["period"]["start"] == "2026-01-10" and "end" not in team["period"]
    phones = sorted(t["value"] for t in team["telecom"])
    assert phones == ["0300 000 0001", "0300 000 0002"] and all(t["system"] == "phone" for t in team["telecom"])
    assert sorted(t["rank"] for t in team["telecom"]) == [1, 2]  # the number to ring now first
    [org_ref] = team["managingOrganization"]
    assert org_ref["reference"] == "Organization/LA001" and org_ref["identifier"] == {"system": ODS, "value": "LA001"}
    # the reference resolves, in the bundle and by a read
    [org] = included(bundle, "Organization")
    assert org["id"] == "LA001" and org["identifier"] == [{"system": ODS, "value": "LA001"}]
    assert await call(client, fmt, "/fhir/Organization/LA001", {**SMARTCARD}) == org
    # an unscheduled access: recorded once, the LA told
    assert len(await accesses(client)) == 1 and len(await inbox(client, "LA001")) == 1


async def test_get_careteam_no_record_found(client, fmt):
    bundle = await call(client, fmt, search("CareTeam", NO_RECORD), guide_headers())
    assert bundle["total"] == 0 and not bundle.get("entry")
    assert await inbox(client, "LA001") == []


async def test_get_careteam_error_is_an_operation_outcome(client, fmt):
    outcome = await call(client, fmt, search("CareTeam", "9990000019"), guide_headers(), 400)  # fails Mod 11
    national_error(outcome, "INVALID_SEARCH_DATA")


@pytest.mark.parametrize("header", ["IsUnscheduledAccessEvent", "IsUnscheduledEvent"])
async def test_scheduled_care_is_a_silent_read(client, fmt, header):
    await put(client)
    headers = {**guide_headers(unscheduled=None), header: "false"}
    bundle = await call(client, fmt, search("CareTeam"), headers)
    assert len(matches(bundle, "CareTeam")) == 1
    assert await accesses(client) == [] and await inbox(client, "LA001") == []


# -- Flag (UK Core) ---------------------------------------------------------------------------------------------------


async def test_get_flag(client, fmt):
    await put(client, startDate="2026-01-10")
    [flag] = matches(await call(client, fmt, search("Flag"), guide_headers()), "Flag")
    assert flag["status"] == "active"
    assert flag["subject"]["identifier"] == {"system": NHS_NUMBER, "value": CHILD}
    codings = {(c["system"], c["code"]) for cat in flag["category"] for c in cat["coding"]}
    assert ("https://fhir.nhs.uk/England/CodeSystem/PatientFlagCategory", "CP-IS") in codings
    assert flag["code"]["coding"][0]["code"] == "342191000000101"
    assert flag["period"]["start"] == "2026-01-10"
    assert flag["author"]["identifier"] == {"system": ODS, "value": "LA001"}


# -- Use case: Get AuditEvent -----------------------------------------------------------------------------------------


async def test_get_auditevent_with_practitioner_roles(client, fmt):
    await put(client)
    first = guide_headers()
    await call(client, fmt, search("CareTeam"), first)
    await call(
        client,
        fmt,
        search("Flag"),
        guide_headers(auth(Role.CARE_SETTING, "RXX02", name="Nurse Test Sample", role_code="R8001")),
    )
    before = await accesses(client)
    # exactly as the guide's example (its IsUnscheduledAccessEvent: true does not make the history an access)
    bundle = await call(client, fmt, search("AuditEvent", extra="&_include=PractitionerRole"), guide_headers())
    assert await accesses(client) == before
    events = matches(bundle, "AuditEvent")
    assert len(events) == 2 and [e["recorded"] for e in events] == sorted((e["recorded"] for e in events), reverse=True)
    mine, theirs = sorted(events, key=lambda e: e["source"]["observer"]["identifier"]["value"])
    for event, ods in ((mine, "RXX01"), (theirs, "RXX02")):
        assert event["action"] == "R" and event["outcome"] == "0"
        assert event["source"]["observer"]["identifier"] == {"system": ODS, "value": ods}
        [patient] = [e for e in event["entity"] if e["what"].get("identifier")]
        assert patient["what"]["identifier"] == {"system": NHS_NUMBER, "value": CHILD}
        assert event["agent"][0]["who"]["reference"].startswith("PractitionerRole/")
    assert mine["agent"][0]["who"]["identifier"] == {"system": SDS_USER, "value": "555000000018"}
    # the TraceID is the sending setting's own: shown to it, not to others
    assert first["TraceID"] in str(mine) and "detail" not in str(theirs)
    roles = {r["id"]: r for r in included(bundle, "PractitionerRole")}
    assert {f"PractitionerRole/{i}" for i in roles} == {e["agent"][0]["who"]["reference"] for e in events}
    doctor = roles[mine["agent"][0]["who"]["reference"].split("/")[1]]
    assert doctor["practitioner"] == {
        "identifier": {"system": SDS_USER, "value": "555000000018"},
        "display": "Dr Test Example",
    }
    assert doctor["organization"]["identifier"] == {"system": ODS, "value": "RXX01"}
    assert doctor["code"][0]["coding"][0] == {
        "system": SDS_ROLE,
        "code": "R8000",
        "display": "Clinical Practitioner Access Role",
    }
    # every PractitionerRole reference resolves by a read too
    for ref in {e["agent"][0]["who"]["reference"] for e in events}:
        assert await call(client, fmt, f"/fhir/{ref}", {**SMARTCARD}) == roles[ref.split("/")[1]]


async def test_get_auditevent_no_record_found(client, fmt):
    bundle = await call(client, fmt, search("AuditEvent", NO_RECORD), guide_headers())
    assert bundle["total"] == 0 and not bundle.get("entry")


# -- error handling ---------------------------------------------------------------------------------------------------


async def test_error_cases(client, fmt):
    r = await client.get(search("CareTeam"), headers={**guide_headers(token=None), "Accept": MEDIA[fmt]})
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    national_error(await call(client, fmt, search("CareTeam"), guide_headers(token=None), 401), "ACCESS_DENIED")
    national_error(await call(client, fmt, search("CareTeam"), guide_headers(token=LA1), 403), "ACCESS_DENIED")
    national_error(
        await call(client, fmt, search("CareTeam"), guide_headers(unscheduled="yes"), 400), "PRECONDITION_FAILED"
    )
    national_error(await call(client, fmt, "/fhir/CareTeam", guide_headers(), 400), "INVALID_SEARCH_DATA")
    national_error(
        await call(client, fmt, search("CareTeam", extra="&_count=5"), guide_headers(), 400), "INVALID_SEARCH_DATA"
    )
    national_error(await call(client, fmt, "/fhir/Organization/LA999", guide_headers(), 404), "RESOURCE_NOT_FOUND")
    assert await accesses(client) == []


# -- the CapabilityStatement the client reads first -------------------------------------------------------------------


async def test_capability_statement_as_the_national_one(client, fmt):
    statement = await call(client, fmt, "/fhir/metadata", {})
    assert statement["fhirVersion"] == "4.0.1" and {"json", "xml"} <= set(statement["format"])
    rest = statement["rest"][0]
    assert any(c["code"] == "SMART-on-FHIR" for s in rest["security"]["service"] for c in s["coding"])
    resources = {r["type"]: r for r in rest["resource"]}
    for kind in ("CareTeam", "Flag", "AuditEvent"):
        assert "patient" in {p["name"] for p in resources[kind]["searchParam"]}
        assert [i["code"] for i in resources[kind]["interaction"]] == ["search-type"]
    assert "PractitionerRole" in resources["AuditEvent"]["searchInclude"]
    assert [i["code"] for i in resources["Organization"]["interaction"]] == ["read"]
    assert [i["code"] for i in resources["PractitionerRole"]["interaction"]] == ["read"]
