"""Authorisation matrix: every route of the app's router x every role -> the expected answer, from one table that
must cover every routed endpoint; unregistered organisations; other LAs' data looks absent (404, empty, never 403)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cpis_bridge.app import create_app
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.web.common import policy_of
from cpis_bridge.web.state import REGISTRY, SERVICES
from tests.support.world import ED, LA1, LA2, OPS, auth, record

NHS = "9990000018"
NHS_OTHER = "9990000026"
IDENT = f"https://fhir.nhs.uk/Id/nhs-number|{NHS}"

ROLES: dict[str, dict[str, str]] = {"none": {}, "care-setting": ED, "ops": OPS, "local-authority": LA1}
PUBLIC = frozenset(ROLES)
LA_ONLY = frozenset({"local-authority"})
CS_ONLY = frozenset({"care-setting"})
OPS_ONLY = frozenset({"ops"})


@dataclass(frozen=True)
class Row:
    """Who may call a route, one concrete request to it, and what an allowed caller gets (None: anything that is
    neither 401/403 nor 5xx, for routes whose handlers live on other branches)."""

    allowed: frozenset[str]
    path: str
    ok: frozenset[int] | None
    json: Any = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


ENCOUNTER = {
    "resourceType": "Encounter",
    "status": "arrived",
    "identifier": [{"system": "urn:test:ed", "value": "enc-m1"}],
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
    "subject": {"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS}},
    "period": {"start": "2026-02-01T10:00:00Z"},
}
CDS_CALL = {
    "hook": "patient-view",
    "hookInstance": "0e6a0f5c-3f1d-4a57-9a4e-6c1b5b1d2a01",
    "context": {"userId": "Practitioner/1", "patientId": "p1"},
    "prefetch": {
        "patient": {
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS}],
        }
    },
}

# (METHOD, route template as the router spells it) -> Row. Every routed endpoint must be here (HEAD follows GET).
TABLE: dict[tuple[str, str], Row] = {
    ("GET", "/healthz"): Row(PUBLIC, "/healthz", frozenset({200})),
    ("GET", "/readyz"): Row(PUBLIC, "/readyz", frozenset({200})),
    ("GET", "/metrics"): Row(PUBLIC, "/metrics", frozenset({200})),
    ("GET", "/v1/openapi.json"): Row(PUBLIC, "/v1/openapi.json", frozenset({200})),
    ("PUT", "/v1/records/{localId}"): Row(LA_ONLY, "/v1/records/M-PUT", frozenset({201}), json=record("M-PUT")),
    ("GET", "/v1/records/{localId}"): Row(LA_ONLY, "/v1/records/M-GET", frozenset({200})),
    ("DELETE", "/v1/records/{localId}"): Row(LA_ONLY, "/v1/records/M-DEL", frozenset({204})),
    ("GET", "/v1/records"): Row(LA_ONLY, f"/v1/records?nhsNumber={NHS}", frozenset({200})),
    ("POST", "/v1/uploads"): Row(
        LA_ONLY,
        "/v1/uploads",
        frozenset({200}),
        json={"sequence": 7, "mode": "delta", "recordCount": 1, "records": [record("M-UP", NHS_OTHER)]},
    ),
    ("GET", "/v1/admin/audit"): Row(OPS_ONLY, f"/v1/admin/audit?nhsNumber={NHS}", frozenset({200})),
    ("GET", "/v1/children/{nhs}/accesses"): Row(LA_ONLY, f"/v1/children/{NHS}/accesses", frozenset({200})),
    ("GET", "/v1/notifications"): Row(LA_ONLY, "/v1/notifications", frozenset({200})),
    ("POST", "/v1/notifications/{id}/ack"): Row(LA_ONLY, "/v1/notifications/no-such-id/ack", frozenset({404})),
    ("GET", "/v1/admin/deliveries"): Row(OPS_ONLY, "/v1/admin/deliveries", frozenset({200})),
    ("POST", "/v1/admin/dead-letters/{id}/retry"): Row(
        OPS_ONLY, "/v1/admin/dead-letters/no-such-id/retry", frozenset({404})
    ),
    ("GET", "/fhir/metadata"): Row(PUBLIC, "/fhir/metadata", frozenset({200})),
    ("GET", "/fhir/CareTeam"): Row(CS_ONLY, f"/fhir/CareTeam?patient:identifier={IDENT}", frozenset({200})),
    ("GET", "/fhir/Flag"): Row(CS_ONLY, f"/fhir/Flag?patient:identifier={IDENT}", frozenset({200})),
    ("GET", "/fhir/AuditEvent"): Row(CS_ONLY, f"/fhir/AuditEvent?patient:identifier={IDENT}", frozenset({200})),
    ("POST", "/fhir/Encounter"): Row(
        CS_ONLY,
        "/fhir/Encounter",
        frozenset({200, 201}),
        json=ENCOUNTER,
        headers={"Content-Type": "application/fhir+json"},
    ),
    ("GET", "/fhir/Encounter/{id}"): Row(CS_ONLY, "/fhir/Encounter/no-such-id", frozenset({404})),
    ("GET", "/fhir/Organization/{id}"): Row(CS_ONLY, "/fhir/Organization/LA001", frozenset({200})),
    ("GET", "/fhir/PractitionerRole/{id}"): Row(CS_ONLY, "/fhir/PractitionerRole/no-such-id", frozenset({404})),
    ("GET", "/cds-services"): Row(PUBLIC, "/cds-services", frozenset({200})),
    ("POST", "/cds-services/{id}"): Row(CS_ONLY, "/cds-services/cpis-patient-view", frozenset({200}), json=CDS_CALL),
    ("POST", "/cds-services/{id}/feedback"): Row(
        CS_ONLY,
        "/cds-services/cpis-patient-view/feedback",
        frozenset({200}),
        json={
            "feedback": [
                {
                    "card": "0e6a0f5c-3f1d-4a57-9a4e-6c1b5b1d2a02",
                    "outcome": "accepted",
                    "outcomeTimestamp": "2026-12-03T10:00:00Z",
                }
            ]
        },
    ),
    # web views: public to the bearer check; each page checks its own session (no session: to the sign-in page,
    # which the client follows), and every form its CSRF token (none here: 400)
    ("GET", "/la/"): Row(PUBLIC, "/la/", frozenset({200})),
    ("GET", "/la/sign-in"): Row(PUBLIC, "/la/sign-in", frozenset({200})),
    ("POST", "/la/sign-in"): Row(
        PUBLIC,
        "/la/sign-in",
        frozenset({400}),
        data=b"ods=LA001&name=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    ("POST", "/la/sign-in/oidc"): Row(
        PUBLIC,
        "/la/sign-in/oidc",
        frozenset({400}),
        data=b"council=LA001",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    # an answer no sign-in attempt of this browser started: a failure (400), counted, so 429 once this address has
    # failed CPIS_WEB_SIGNIN_FAILURES times
    ("GET", "/la/sign-in/callback"): Row(PUBLIC, "/la/sign-in/callback?code=x&state=y", frozenset({400, 429})),
    ("POST", "/la/sign-out"): Row(PUBLIC, "/la/sign-out", frozenset({200})),
    ("GET", "/la/signed-out"): Row(PUBLIC, "/la/signed-out", frozenset({200})),
    ("GET", "/la/notifications"): Row(PUBLIC, "/la/notifications", frozenset({200})),
    ("GET", "/la/notifications/{id}"): Row(PUBLIC, "/la/notifications/no-such-id", frozenset({200})),
    ("POST", "/la/notifications/{id}/acknowledge"): Row(PUBLIC, "/la/notifications/x/acknowledge", frozenset({200})),
    ("GET", "/la/children"): Row(PUBLIC, "/la/children", frozenset({200})),
    ("GET", "/la/events"): Row(PUBLIC, "/la/events", frozenset({200})),
    ("POST", "/la/children"): Row(PUBLIC, "/la/children", frozenset({200})),
    ("GET", "/la/assets/{path}"): Row(PUBLIC, "/la/assets/la.js", frozenset({200})),
    ("GET", "/ed/"): Row(PUBLIC, "/ed/", frozenset({200})),
    ("GET", "/ed/sign-in"): Row(PUBLIC, "/ed/sign-in", frozenset({200})),
    ("POST", "/ed/sign-in"): Row(
        PUBLIC,
        "/ed/sign-in",
        frozenset({400}),
        data=b"ods=RXX01&name=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    ("POST", "/ed/sign-out"): Row(PUBLIC, "/ed/sign-out", frozenset({200})),
    ("GET", "/ed/signed-out"): Row(PUBLIC, "/ed/signed-out", frozenset({200})),
    # a launch from an EHR the registry does not know, and a callback with no launch pending: refused, counted
    ("GET", "/ed/launch"): Row(PUBLIC, "/ed/launch?iss=https://ehr.example/fhir&launch=x", frozenset({400, 429})),
    ("GET", "/ed/callback"): Row(PUBLIC, "/ed/callback?code=x&state=y", frozenset({400, 429})),
    ("GET", "/ed/children/{view}"): Row(PUBLIC, "/ed/children/no-such-view", frozenset({200})),
    ("POST", "/ed/children"): Row(PUBLIC, "/ed/children", frozenset({200})),
    ("GET", "/ed/assets/{path}"): Row(PUBLIC, "/ed/assets/ed.js", frozenset({200})),
}


def all_routes(app: web.Application) -> dict[tuple[str, str], Any]:
    """Every (METHOD, template) -> handler the router holds, HEAD included."""
    out: dict[tuple[str, str], Any] = {}
    for route in app.router.routes():
        assert route.resource is not None
        assert route.method != "*", f"wildcard-method route {route.resource.canonical}: list its methods"
        out[(route.method, route.resource.canonical)] = route.handler
    return out


def row_for(key: tuple[str, str]) -> Row:
    method, path = key
    return TABLE[("GET", path) if method == "HEAD" else key]


def test_table_covers_the_router(settings: Any) -> None:
    routes = all_routes(create_app(settings))
    table_keys = {("GET", p) if m == "HEAD" else (m, p) for m, p in routes}
    assert sorted(table_keys - set(TABLE)) == [], "routes missing from the authorisation table"
    unrouted = set(TABLE) - table_keys
    assert sorted(unrouted) == [], "table rows for routes the router lacks"


def test_table_agrees_with_route_policies(settings: Any) -> None:
    """The table is written independently of the code; a policy change must show up here as a deliberate edit."""
    for key, handler in all_routes(create_app(settings)).items():
        policy = policy_of(handler)
        assert policy is not None, f"{key} has no @allow policy"
        expected = row_for(key).allowed
        actual = (
            PUBLIC
            if policy.public
            else frozenset(r.value for r in (policy.roles | ({Role.CARE_SETTING} if policy.cds else set())))
        )
        assert actual == expected, key


async def _seed(client: Any) -> None:
    for lid in ("M-GET", "M-DEL"):
        r = await client.put(f"/v1/records/{lid}", json=record(lid), headers=LA1)
        assert r.status == 201, await r.text()


def _expected_content_type(path: str) -> str:
    return "application/fhir+json" if path.startswith("/fhir") else "application/problem+json"


async def test_every_route_every_role(client: Any) -> None:
    await _seed(client)
    routes = all_routes(client.app)
    assert len(routes) >= 10
    checked: dict[str, int] = defaultdict(int)
    for key in sorted(routes, key=lambda k: (k[1], k[0] != "HEAD")):  # HEAD first: it must not change anything
        method, _ = key
        row = row_for(key)
        for role, headers in ROLES.items():
            r = await client.request(method, row.path, json=row.json, data=row.data, headers={**headers, **row.headers})
            where = f"{method} {row.path} as {role}: {r.status}"
            assert r.status < 500, where
            if role in row.allowed:
                assert r.status not in (401, 403), where
                if row.ok is not None and method != "HEAD":
                    assert r.status in row.ok, where + " " + await r.text()
            else:
                assert r.status == (401 if role == "none" else 403), where
                if method != "HEAD":
                    assert r.content_type == _expected_content_type(row.path), where
                    if r.status == 401 and not row.path.startswith("/fhir"):
                        body = await r.json()
                        assert body["status"] == 401 and body["title"], where
            checked[role] += 1
    assert set(checked) == set(ROLES)


async def test_unregistered_organisation_is_forbidden(client: Any) -> None:
    strangers = {
        "local-authority": auth(Role.LOCAL_AUTHORITY, "LA999"),
        "care-setting": auth(Role.CARE_SETTING, "ZZZ99"),
    }
    no_ods = {
        "local-authority": auth(Role.LOCAL_AUTHORITY, ""),
        "care-setting": auth(Role.CARE_SETTING, ""),
    }
    await _seed(client)
    tried = 0
    for key in all_routes(client.app):
        row = row_for(key)
        if row.allowed == PUBLIC:
            continue
        for role in row.allowed & set(strangers):
            for headers, status in ((strangers[role], 403), (no_ods[role], 401)):  # a missing claim is 401
                r = await client.request(key[0], row.path, json=row.json, headers={**headers, **row.headers})
                assert r.status == status, f"{key} as unregistered {role}: {r.status}"
                tried += 1
    assert tried >= 6
    r = await client.get("/v1/records/M-GET", headers=LA1)
    assert r.status == 200  # nothing above changed or erased it


async def test_other_las_records_look_absent(client: Any) -> None:
    r = await client.put("/v1/records/CASE-X", json=record("CASE-X"), headers=LA1)
    assert r.status == 201
    mine = await r.json()

    r = await client.get("/v1/records/CASE-X", headers=LA2)
    assert r.status == 404 and r.content_type == "application/problem+json"
    assert (await r.json())["status"] == 404
    r = await client.get("/v1/records/NEVER-EXISTED", headers=LA2)
    never = await r.json()
    assert r.status == 404
    r = await client.get("/v1/records/CASE-X", headers=LA2)
    assert {k: v for k, v in (await r.json()).items()} == never  # indistinguishable from a record that never was
    r = await client.delete("/v1/records/CASE-X", headers=LA2)
    assert r.status == 404
    r = await client.get(f"/v1/records?nhsNumber={NHS}", headers=LA2)
    assert r.status == 200 and await r.json() == {"records": []}

    # LA2 using the same localId makes its own record; a full upload without it ends only LA2's own.
    r = await client.put("/v1/records/CASE-X", json=record("CASE-X", NHS_OTHER), headers=LA2)
    assert r.status == 201
    r = await client.post(
        "/v1/uploads", json={"sequence": 1, "mode": "full", "records": [record("CASE-Y", NHS_OTHER)]}, headers=LA2
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["ended"] == 1

    r = await client.get("/v1/records/CASE-X", headers=LA1)
    assert r.status == 200
    assert await r.json() == mine
    r = await client.get(f"/v1/records?nhsNumber={NHS}", headers=LA1)
    assert [x["localId"] for x in (await r.json())["records"]] == ["CASE-X"]


async def _record_access(app: web.Application) -> None:
    setting = app[REGISTRY].care_settings["RXX01"]
    ctx = AuditContext(Principal("dev-care-setting-RXX01", Role.CARE_SETTING, "RXX01", name="Dr Test Example"))
    outcome = await app[SERVICES].access.lookup(
        ctx, LookupRequest(NhsNumber.parse(NHS), setting, "careteam", source_event_id="authz-evt-1")
    )
    assert outcome.status == 1 and outcome.access_id


async def test_other_las_accesses_and_notifications_look_absent(client: Any) -> None:
    r = await client.put("/v1/records/CASE-A", json=record("CASE-A"), headers=LA1)
    assert r.status == 201
    await _record_access(client.app)
    r = await client.get(f"/v1/children/{NHS}/accesses", headers=LA1)
    assert r.status == 200 and len((await r.json())["accesses"]) == 1
    r = await client.get(f"/v1/children/{NHS}/accesses", headers=LA2)
    assert r.status == 404
    r = await client.get(f"/v1/children/{NHS_OTHER}/accesses", headers=LA2)
    assert r.status == 404
    r = await client.get("/v1/notifications", headers=LA1)
    assert r.status == 200
    mine = (await r.json())["notifications"]
    assert len(mine) == 1
    r = await client.get("/v1/notifications", headers=LA2)
    assert r.status == 200
    assert (await r.json())["notifications"] == []
    r = await client.post(f"/v1/notifications/{mine[0]['id']}/ack", headers=LA2)
    assert r.status == 404
    r = await client.get("/v1/notifications", headers=LA1)
    assert [n.get("acknowledged", False) for n in (await r.json())["notifications"]] == [False]
