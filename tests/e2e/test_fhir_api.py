"""The care-setting FHIR API over HTTP against real Redis: every request of docs/contract.md §3; every FHIR answer is
R4 (fhir.resources R4B) and conforms to the profiles in fhir_profiles/."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from lxml import etree

from cpis_bridge.app import KEYS, REDIS, create_app
from cpis_bridge.core.principal import Role
from cpis_bridge.fhir.outcome import operation_outcome
from cpis_bridge.web.state import METRICS
from tests.e2e.test_profiles import PROFILES, assert_conforms, example
from tests.support.world import ED, GP, LA1, LA2, REGISTRY, auth, record

pytestmark = pytest.mark.no_relays  # these tests inspect the notification queue

NHS_SYS = "https://fhir.nhs.uk/Id/nhs-number"
CHILD = "9990000018"
OTHER = "9990000026"
FHIR_CT = "application/fhir+json"
ED2 = auth(Role.CARE_SETTING, "RXX02", name="Nurse Test Sample", role_code="R0260")
EXT_PURPOSE = "https://cpis-bridge.example.org/fhir/StructureDefinition/la-contact-purpose"
ASSIGNED = "AuditEvent:entity-type=http://terminology.hl7.org/CodeSystem/v3-RoleClass|ASSIGNED"


def q(nhs: str = CHILD) -> str:
    return f"patient:identifier={NHS_SYS}|{nhs}"


async def fhir_json(resp: Any, status: int = 200) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == FHIR_CT
    body: dict[str, Any] = await resp.json(content_type=None)
    assert_conforms(body)
    return body


async def accesses(client: Any, nhs: str = CHILD) -> list[str]:
    keys = client.app[KEYS]
    return await client.app[REDIS].lrange(keys.accesses(keys.tag(nhs)), 0, -1)


async def inbox(client: Any, la: str) -> list[dict[str, str]]:
    return [fields for _, fields in await client.app[REDIS].xrange(client.app[KEYS].inbox(la))]


async def put(client: Any, lid: str = "CASE-1", headers: dict[str, str] = LA1, **kw: Any) -> None:
    r = await client.put(f"/v1/records/{lid}", json=record(lid, **kw), headers=headers)
    assert r.status in (200, 201), await r.text()


def metric(client: Any, kind: str, flagged: str) -> float:
    return client.app[METRICS].accesses.labels(kind=kind, flagged=flagged)._value.get()


def encounter_body(value: str = "ATT-1", nhs: str = CHILD, **extra: Any) -> dict[str, Any]:
    body = copy.deepcopy(example("Encounter-request-example"))
    body["identifier"][0]["value"] = value
    body["subject"]["identifier"]["value"] = nhs
    body.update(extra)
    return body


# -- metadata -------------------------------------------------------------------------------------------------------


async def test_metadata_is_public_and_lists_exactly_what_is_routed(client):
    body = await fhir_json(await client.get("/fhir/metadata"))
    assert body["fhirVersion"] == "4.0.1" and body["kind"] == "instance"
    got = {r["type"]: sorted(i["code"] for i in r["interaction"]) for r in body["rest"][0]["resource"]}
    assert got == {
        "AuditEvent": ["search-type"],
        "CareTeam": ["search-type"],
        "Encounter": ["create", "read"],
        "Flag": ["search-type"],
        "Organization": ["read"],
        "PractitionerRole": ["read"],
    }
    audit = next(r for r in body["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert ASSIGNED in audit["searchInclude"] and "PractitionerRole" in audit["searchInclude"]
    served = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource.canonical.startswith("/fhir/") and route.method != "HEAD"
    }
    assert served == {
        ("GET", "/fhir/metadata"),
        ("GET", "/fhir/CareTeam"),
        ("GET", "/fhir/Flag"),
        ("GET", "/fhir/AuditEvent"),
        ("POST", "/fhir/Encounter"),
        ("GET", "/fhir/Encounter/{id}"),
        ("GET", "/fhir/Organization/{id}"),
        ("GET", "/fhir/PractitionerRole/{id}"),
    }


# -- CareTeam -------------------------------------------------------------------------------------------------------


async def test_careteam_unscheduled_records_access_and_notifies(client):
    await put(client)
    r = await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "TraceID": "trace-ct-1"})
    assert r.headers["TraceID"] == "trace-ct-1"
    body = await fhir_json(r)
    assert body["type"] == "searchset" and body["total"] == 1
    [team] = [e for e in body["entry"] if e["search"]["mode"] == "match"]
    [org] = [e for e in body["entry"] if e["search"]["mode"] == "include"]
    ct = team["resource"]
    assert ct["resourceType"] == "CareTeam" and ct["subject"]["identifier"] == {"system": NHS_SYS, "value": CHILD}
    assert ct["category"][0]["coding"][0]["code"] == "342191000000101"
    assert ct["period"] == {"start": "2026-01-10"}
    assert ct["managingOrganization"][0]["reference"] == "Organization/LA001"
    o = org["resource"]
    assert o["resourceType"] == "Organization" and o["name"] == "Example Borough Council Children's Services"
    assert o["identifier"] == [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "LA001"}]
    phones = {c["purpose"]["coding"][0]["code"]: c["telecom"][0]["value"] for c in o["contact"]}
    assert phones == {"office-hours": "0300 000 0001", "emergency-duty": "0300 000 0002"}
    assert org["fullUrl"].endswith("/fhir/Organization/LA001")
    [acc] = await accesses(client)
    assert acc.startswith("RXX01\x1ftrace-ct-1\x1f")
    [note] = await inbox(client, "LA001")
    assert orjson.loads(note["recs"]) == [
        {"localId": "CASE-1", "planType": "CPP", "startDate": "2026-01-10", "endDate": None}
    ]
    # LA001 has no push channel here: the notification is in its pull inbox, indexed, and nothing is queued
    assert await client.app[REDIS].xlen(client.app[KEYS].notify_queue) == 0
    assert await client.app[REDIS].hlen(client.app[KEYS].inbox_index("LA001")) == 1
    assert metric(client, "unscheduled", "true") == 1


ALWAYS_OPEN = (
    "    officeHours: {days: [Mon, Tue, Wed, Thu, Fri, Sat, Sun], open: '00:00', close: '24:00', bankHolidays: open}\n"
)
NEVER_OPEN = "    officeHours: {days: []}\n"


@pytest.fixture
async def office_client(aiohttp_client, make_settings, tmp_path):
    """LA001's office is always open, LA002's never: which number to ring does not depend on the test's clock."""
    lines = (REGISTRY.read_text()).splitlines(keepends=True)
    out: list[str] = []
    for line in lines:
        out.append(line)
        if 'emergencyDutyPhone: "0300 000 0002"' in line:
            out.append(ALWAYS_OPEN)
        elif 'emergencyDutyPhone: "0300 000 0012"' in line:
            out.append(NEVER_OPEN)
    path = tmp_path / "registry.yaml"
    path.write_text("".join(out))
    return await aiohttp_client(create_app(make_settings(registry=path, relays=False)))


async def test_careteam_names_the_la_ranks_the_number_to_ring_now_and_status_follows_the_plan(office_client):
    client = office_client
    await put(client, "RUN-1")
    await put(client, "END-1", headers=LA2, planType="LAC", lacLegalBasis="s31", endDate="2026-03-01")
    body = await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    teams = {e["resource"]["name"]: e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"}
    orgs = {e["resource"]["id"]: e["resource"] for e in body["entry"] if e["search"]["mode"] == "include"}

    def ring(telecom: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return [(t["extension"][0]["valueCoding"]["code"], t["value"], t["rank"]) for t in telecom]

    running = teams["Example Borough Council Children's Services"]
    ended = teams["Sample County Council Children's Social Care"]
    assert running["status"] == "active" and "end" not in running["period"]
    assert ended["status"] == "inactive" and ended["period"]["end"] == "2026-03-01"
    assert ring(running["telecom"]) == [("office-hours", "0300 000 0001", 1), ("emergency-duty", "0300 000 0002", 2)]
    assert ring(ended["telecom"]) == [("emergency-duty", "0300 000 0012", 1), ("office-hours", "0300 000 0011", 2)]
    assert ring(orgs["LA001"]["telecom"]) == ring(running["telecom"])
    assert ring(orgs["LA002"]["telecom"]) == ring(ended["telecom"])
    for team in teams.values():
        assert all(t["extension"][0]["url"] == EXT_PURPOSE for t in team["telecom"])


async def test_same_trace_id_is_one_access_and_no_trace_id_is_a_new_access_each_time(client):
    await put(client)
    for _ in range(2):
        await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "TraceID": "same"}))
    assert len(await accesses(client)) == 1
    for _ in range(2):
        await fhir_json(await client.get(f"/fhir/Flag?{q()}", headers=ED))
    assert len(await accesses(client)) == 3
    assert len(await inbox(client, "LA001")) == 3


@pytest.mark.parametrize("path", ["CareTeam", "Flag"])
async def test_silent_reads_leave_no_access(client, path):
    await put(client)
    r = await client.get(f"/fhir/{path}?{q()}", headers={**ED, "IsUnscheduledAccessEvent": "false"})
    assert (await fhir_json(r))["total"] == 1
    r = await client.get(f"/fhir/{path}?{q()}", headers={**GP, "IsUnscheduledAccessEvent": "true"})
    assert (await fhir_json(r))["total"] == 1
    r = await client.get(f"/fhir/{path}?{q()}", headers=GP)
    assert (await fhir_json(r))["total"] == 1
    assert await accesses(client) == []
    assert await inbox(client, "LA001") == []
    assert metric(client, "silent", "true") == 3 and metric(client, "unscheduled", "true") == 0
    keys = client.app[KEYS]
    audit = [orjson.loads(a) for a in await client.app[REDIS].lrange(keys.audit(keys.tag(CHILD)), 0, -1)]
    assert [a["action"] for a in audit[:3]] == [f"lookup.{path.lower()}.silent"] * 3


async def test_unflagged_child_keeps_nothing_and_looks_like_any_empty_answer(client):
    await put(client, "OLD", nhs=OTHER, startDate="2020-01-01", endDate="2020-06-01")  # long invisible
    empty_unknown = await fhir_json(await client.get(f"/fhir/CareTeam?{q('9990000034')}", headers=ED))
    empty_ended = await fhir_json(await client.get(f"/fhir/CareTeam?{q(OTHER)}", headers=ED))
    for body in (empty_unknown, empty_ended):
        assert body["total"] == 0 and "entry" not in body
    assert set(empty_unknown) == set(empty_ended)
    assert await accesses(client, "9990000034") == [] and await accesses(client, OTHER) == []
    assert await inbox(client, "LA001") == []
    keys = client.app[KEYS]
    [entry] = await client.app[REDIS].lrange(keys.audit(keys.tag("9990000034")), 0, -1)
    assert orjson.loads(entry)["nhsNumber"] is None
    assert metric(client, "unscheduled", "false") == 2


async def test_two_las_one_notification_each_with_only_their_records(client):
    await put(client, "A-1")
    await put(client, "A-2", planType="LAC")
    await put(client, "B-1", headers=LA2)
    body = await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "TraceID": "t-two"}))
    assert body["total"] == 3
    orgs = sorted(e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "include")
    assert orgs == ["LA001", "LA002"]
    la1, la2 = await inbox(client, "LA001"), await inbox(client, "LA002")
    assert len(la1) == 1 and len(la2) == 1
    assert sorted(r["localId"] for r in orjson.loads(la1[0]["recs"])) == ["A-1", "A-2"]
    assert [r["localId"] for r in orjson.loads(la2[0]["recs"])] == ["B-1"]
    assert la1[0]["acc"] == la2[0]["acc"]
    assert await client.app[REDIS].xlen(client.app[KEYS].notify_queue) == 0  # both LAs are inbox-only here
    for la in ("LA001", "LA002"):
        assert await client.app[REDIS].hlen(client.app[KEYS].inbox_index(la)) == 1


# -- Flag -----------------------------------------------------------------------------------------------------------


async def test_flag_is_uk_core_with_cpis_category_and_snomed(client):
    await put(client, "U-1", planType="UCPP", expectedDeliveryDate="2027-01-15", dateOfBirth="1998-02-03")
    body = await fhir_json(await client.get(f"/fhir/Flag?{q()}", headers=ED))
    [entry] = body["entry"]
    flag = entry["resource"]
    assert "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Flag" in flag["meta"]["profile"]
    cats = {c["coding"][0]["code"] for c in flag["category"]}
    assert cats == {"safety", "CP-IS"}
    codes = {(c["system"], c["code"]) for c in flag["code"]["coding"]}
    assert ("http://snomed.info/sct", "818901000000100") in codes
    assert ("https://cpis-bridge.example.org/CodeSystem/plan-type", "UCPP") in codes
    assert flag["status"] == "active" and flag["author"]["identifier"]["value"] == "LA001"
    assert len(await accesses(client)) == 1 and len(await inbox(client, "LA001")) == 1


# -- AuditEvent -----------------------------------------------------------------------------------------------------


async def test_auditevent_newest_25_of_30_and_never_itself_an_access(client):
    await put(client)
    for i in range(30):
        await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "TraceID": f"e{i:02d}"}))
    before = await accesses(client)
    assert len(before) == 30  # the access log keeps every access (up to 1,000); the history shown is the newest 25
    r = await client.get(f"/fhir/AuditEvent?{q()}", headers={**ED, "IsUnscheduledAccessEvent": "true"})
    body = await fhir_json(r)
    assert body["total"] == 25 and len(body["entry"]) == 25
    events = [e["resource"] for e in body["entry"]]
    sources = [next(d["valueString"] for ent in ev["entity"] for d in ent.get("detail", [])) for ev in events]
    assert sources == [f"e{i:02d}" for i in range(29, 4, -1)]
    # another care setting sees the same 25 accesses without the TraceIDs the first one sent
    other = await fhir_json(await client.get(f"/fhir/AuditEvent?{q()}", headers=ED2))
    assert [e["resource"]["id"] for e in other["entry"]] == [ev["id"] for ev in events]
    assert not any("detail" in ent for e in other["entry"] for ent in e["resource"]["entity"])
    assert "sourceEventId" not in orjson.dumps(other).decode()
    recorded = [ev["recorded"] for ev in events]
    assert recorded == sorted(recorded, reverse=True)
    ev = events[0]
    assert ev["source"]["observer"]["identifier"]["value"] == "RXX01"
    assert ev["source"]["observer"]["display"] == "Example Hospital Emergency Department"
    assert ev["agent"][0]["who"]["display"] == "Dr Test Example"
    assert await accesses(client) == before
    keys = client.app[KEYS]
    [last] = await client.app[REDIS].lrange(keys.audit(keys.tag(CHILD)), 0, 0)
    assert orjson.loads(last)["action"] == "read.auditevent"


async def test_auditevent_include_practitioner_roles(client):
    await put(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    await fhir_json(await client.get(f"/fhir/Flag?{q()}", headers=ED2))
    await fhir_json(await client.get(f"/fhir/Flag?{q()}", headers=ED2))
    r = await client.get(f"/fhir/AuditEvent?{q()}&_include={ASSIGNED}", headers=ED)
    body = await fhir_json(r)
    assert body["total"] == 3
    roles = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "include"]
    assert sorted(r["organization"]["identifier"]["value"] for r in roles) == ["RXX01", "RXX02"]
    assert {r["practitioner"]["display"] for r in roles} == {"Dr Test Example", "Nurse Test Sample"}
    refs = {e["resource"]["agent"][0]["who"]["reference"] for e in body["entry"] if e["search"]["mode"] == "match"}
    assert refs == {f"PractitionerRole/{r['id']}" for r in roles}
    r = await client.get(f"/fhir/AuditEvent?{q()}&_include=AuditEvent:patient", headers=ED)
    assert (await fhir_json(r, 400))["issue"][0]["code"] == "invalid"


async def test_auditevent_empty_when_no_record_visible(client):
    await put(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    assert len(await accesses(client)) == 1
    assert (await client.delete("/v1/records/CASE-1", headers=LA1)).status == 204
    body = await fhir_json(await client.get(f"/fhir/AuditEvent?{q()}&_include={ASSIGNED}", headers=ED))
    assert body["total"] == 0 and "entry" not in body
    body = await fhir_json(await client.get(f"/fhir/AuditEvent?{q(OTHER)}", headers=ED))
    assert body["total"] == 0


# -- Encounter ------------------------------------------------------------------------------------------------------


async def test_encounter_post_retains_minimal_encounter_and_repeat_is_idempotent(client):
    await put(client)
    body = encounter_body(
        reasonCode=[{"text": "fall from bicycle"}], participant=[{"individual": {"display": "Dr Test Example"}}]
    )
    r = await client.post("/fhir/Encounter", data=orjson.dumps(body), headers={**ED, "Content-Type": FHIR_CT})
    created = await fhir_json(r, 201)
    assert r.headers["Location"].endswith(f"/fhir/Encounter/{created['id']}")
    assert set(created) == {
        "resourceType",
        "id",
        "meta",
        "identifier",
        "status",
        "class",
        "subject",
        "period",
        "serviceProvider",
    }
    assert created["serviceProvider"]["identifier"]["value"] == "RXX01"
    [acc] = await accesses(client)
    assert acc.split("\x1f")[1] == "https://rxx01.example/Id/attendance|ATT-1"
    assert acc.split("\x1f")[3] != ""  # arrivedAt = period.start
    again = await client.post("/fhir/Encounter", data=orjson.dumps(body), headers={**ED, "Content-Type": FHIR_CT})
    assert await fhir_json(again, 200) == created
    assert len(await accesses(client)) == 1 and len(await inbox(client, "LA001")) == 1
    read = await client.get(f"/fhir/Encounter/{created['id']}", headers=ED)
    assert await fhir_json(read) == created
    assert "fall" not in orjson.dumps(created).decode()
    other = await client.get(f"/fhir/Encounter/{created['id']}", headers=ED2)
    assert (await fhir_json(other, 404))["issue"][0]["code"] == "not-found"
    missing = await client.get("/fhir/Encounter/00000000-0000-0000-0000-000000000000", headers=ED)
    await fhir_json(missing, 404)


async def test_encounter_arriving_within_5_minutes_is_accepted(client):
    await put(client)
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)).isoformat(timespec="seconds")
    r = await client.post("/fhir/Encounter", json=encounter_body(period={"start": soon}), headers=ED)
    assert r.status == 201, await r.text()


async def test_encounter_without_visible_record_or_from_scheduled_setting_retains_nothing(client):
    r = await client.post("/fhir/Encounter", json=encounter_body(nhs=OTHER), headers=ED)
    outcome = await fhir_json(r, 200)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "information"
    await put(client)
    r = await client.post("/fhir/Encounter", json=encounter_body("GP-1"), headers=GP)
    outcome = await fhir_json(r, 200)
    assert outcome["issue"][0]["severity"] == "information" and "scheduled" in outcome["issue"][0]["diagnostics"]
    assert await accesses(client) == [] and await accesses(client, OTHER) == []
    assert await inbox(client, "LA001") == []
    enc_keys = [k async for k in client.app[REDIS].scan_iter(match=client.app[KEYS].encounter("*"))]
    assert enc_keys == []


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda b: b.pop("period"), "Encounter.period.start"),
        (lambda b: b["period"].update(start="2026-11-21T22:05:00"), "Encounter.period.start"),
        (lambda b: b.pop("identifier"), "Encounter.identifier"),
        (lambda b: b.pop("class"), "Encounter.class"),
        (lambda b: b.update(status="bogus"), "Encounter.status"),
        (lambda b: b["subject"]["identifier"].update(value="9990000019"), "Encounter.subject.identifier.value"),
        (lambda b: b["subject"]["identifier"].update(system="urn:other"), "Encounter.subject.identifier"),
        (lambda b: b.update(unknownElement=1), "Encounter.unknownElement"),
        (lambda b: b.update(resourceType="Patient"), "Encounter.resourceType"),
        (lambda b: b["period"].update(start="2030-01-01T09:00:00Z"), "Encounter.period.start"),  # ahead: the plain path
        (lambda b: b["period"].update(start="2030-01-01"), "Encounter.period.start"),  # and the model's
        (
            lambda b: b["period"].update(start=(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)).isoformat()),
            "Encounter.period.start",
        ),
    ],
)
async def test_invalid_encounter_is_422_naming_the_field(client, mutate, field):
    body = encounter_body()
    mutate(body)
    r = await client.post("/fhir/Encounter", json=body, headers=ED)
    outcome = await fhir_json(r, 422)
    assert field in outcome["issue"][0]["expression"], outcome


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"/fhir/CareTeam?{q()}&name=x",
        "/fhir/CareTeam",
        f"/fhir/Flag?patient:identifier=urn:other|{CHILD}",
        "/fhir/Flag?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|1234567890",
        f"/fhir/Flag?{q()}&{q()}",
        f"/fhir/AuditEvent?{q()}&_count=5",
        f"/fhir/CareTeam?{q()}&_include=CareTeam:subject",
        f"/fhir/CareTeam?patient={NHS_SYS}|{CHILD}",
    ],
)
async def test_bad_searches_are_400_operation_outcomes(client, url):
    outcome = await fhir_json(await client.get(url, headers=ED), 400)
    assert outcome["issue"][0]["severity"] == "error" and CHILD not in orjson.dumps(outcome).decode()


async def test_error_statuses_are_operation_outcomes(client):
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}"), 401)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=LA1), 403)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=auth(Role.CARE_SETTING, "ZZZ99")), 403)
    await fhir_json(await client.get("/fhir/Patient", headers=ED), 404)
    await fhir_json(await client.delete("/fhir/CareTeam", headers=ED), 405)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "IsUnscheduledAccessEvent": "maybe"}), 400)
    await fhir_json(
        await client.post("/fhir/Encounter", data=b"{not json", headers={**ED, "Content-Type": FHIR_CT}), 400
    )
    await fhir_json(
        await client.post("/fhir/Encounter", data=b"<Encounter/>", headers={**ED, "Content-Type": "text/plain"}), 415
    )
    big = orjson.dumps(encounter_body(text={"status": "generated", "div": "x" * (1024 * 1024 + 10)}))
    await fhir_json(await client.post("/fhir/Encounter", data=big, headers={**ED, "Content-Type": FHIR_CT}), 413)
    await fhir_json(await client.get("/fhir/Encounter/not a valid id!", headers=ED), 404)
    assert await accesses(client) == []


async def commandstats(client: Any) -> dict[str, int]:
    info = await client.app[REDIS].info("commandstats")
    return {k: v["calls"] for k, v in info.items()}


async def test_careteam_lookup_is_one_redis_round_trip_and_head_records_nothing(client):
    await put(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))  # script loaded, pool warm
    before = await commandstats(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    after = await commandstats(client)
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    delta.pop("cmdstat_info", None)
    # commandstats also counts what the script runs inside Redis: one EVALSHA from the client, the rest the script's
    assert delta.pop("cmdstat_evalsha") == 1 and delta.pop("cmdstat_hgetall") == 1, delta
    assert set(delta) <= {f"cmdstat_{c}" for c in ("lrange", "lpush", "ltrim", "hget", "hset", "xadd")}, delta
    r = await client.head(f"/fhir/CareTeam?{q()}", headers=ED)
    assert r.status == 405
    assert len(await accesses(client)) == 2


async def test_client_chosen_names_never_echo_an_nhs_number(client):
    outcome = await fhir_json(await client.get(f"/fhir/Flag?{q()}&{CHILD}=1", headers=ED), 400)
    assert CHILD not in orjson.dumps(outcome).decode()
    outcome = await fhir_json(await client.get(f"/fhir/Flag?{q()}&name=1", headers=ED), 400)
    assert "name" in outcome["issue"][0]["diagnostics"]
    body = encounter_body(**{CHILD: True, f"x{CHILD}": 1})
    outcome = await fhir_json(await client.post("/fhir/Encounter", json=body, headers=ED), 422)
    assert CHILD not in orjson.dumps(outcome).decode()


# -- national conventions: error codes, formats, statement, minimisation, headers -------------------------------------

SPINE = "https://fhir.hl7.org.uk/CodeSystem/UKCore-SpineErrorOrWarningCode"
XML_CT = "application/fhir+xml"


def spine_code(outcome: dict[str, Any]) -> str:
    [coding] = outcome["issue"][0]["details"]["coding"]
    assert coding["system"] == SPINE and coding["display"]
    return str(coding["code"])


def normalised(body: dict[str, Any]) -> dict[str, Any]:
    """A JSON answer as the R4B model writes it back (instants and the like in one spelling)."""
    model = get_fhir_model_class(body["resourceType"]).model_validate(body)
    return dict(orjson.loads(model.model_dump_json()))


def from_xml(text: str) -> dict[str, Any]:
    """An XML answer parsed back through the R4B models: it must be valid FHIR XML of the resource it names."""
    root = etree.fromstring(text.encode())
    assert root.nsmap[None] == "http://hl7.org/fhir"
    kind = etree.QName(root).localname
    return dict(orjson.loads(get_fhir_model_class(kind).model_validate_xml(text.encode()).model_dump_json()))


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        (("GET", f"/fhir/CareTeam?patient:identifier={NHS_SYS}|9990000019", ED), 400, "INVALID_SEARCH_DATA"),  # Mod 11
        (("GET", "/fhir/CareTeam", ED), 400, "INVALID_SEARCH_DATA"),
        (("GET", f"/fhir/Flag?{q()}&colour=red", ED), 400, "INVALID_SEARCH_DATA"),
        (("GET", f"/fhir/CareTeam?{q()}", {**ED, "IsUnscheduledAccessEvent": "maybe"}), 400, "PRECONDITION_FAILED"),
        (("GET", f"/fhir/CareTeam?{q()}", {**ED, "IsUnscheduledEvent": "perhaps"}), 400, "PRECONDITION_FAILED"),
        (("GET", f"/fhir/CareTeam?{q()}", {}), 401, "ACCESS_DENIED"),
        (("GET", f"/fhir/CareTeam?{q()}", LA1), 403, "ACCESS_DENIED"),
        (("GET", "/fhir/Encounter/no-such-id", ED), 404, "RESOURCE_NOT_FOUND"),
        (("GET", "/fhir/Organization/LA999", ED), 404, "RESOURCE_NOT_FOUND"),
        (("GET", "/fhir/Patient", ED), 404, "UNSUPPORTED_SERVICE"),
        (("DELETE", "/fhir/CareTeam", ED), 405, "UNSUPPORTED_SERVICE"),
        (("GET", f"/fhir/CareTeam?{q()}&_format=text/html", ED), 406, "UNSUPPORTED_VALUE"),
        (("POST", "/fhir/Encounter", {**ED, "Content-Type": "text/plain"}), 415, "UNSUPPORTED_VALUE"),
    ],
)
async def test_errors_carry_the_national_code(client, request_args, status, code):
    method, url, headers = request_args
    outcome = await fhir_json(await client.request(method, url, headers=headers, data=b"x"), status)
    assert spine_code(outcome) == code
    assert outcome["issue"][0]["severity"] == "error" and outcome["issue"][0]["code"] != "informational"
    assert await accesses(client) == []


async def test_401_names_the_bearer_scheme(client):
    r = await client.get(f"/fhir/CareTeam?{q()}")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = await client.get(f"/fhir/CareTeam?{q()}", headers={"Authorization": "Bearer not.a.token"})
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    r = await client.get("/v1/records/CASE-1")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"


def test_server_errors_have_national_codes_too():
    for status, code in (
        (500, "FAILURE_TO_PROCESS_MESSAGE"),
        (503, "UNABLE_TO_CALL_SERVICE"),
        (504, "UNABLE_TO_CALL_SERVICE"),
        (502, "FAILURE_TO_PROCESS_MESSAGE"),
    ):
        outcome = operation_outcome(status, "x")
        assert spine_code(outcome) == code and outcome["issue"][0]["severity"] == "error"
    assert "details" not in operation_outcome(200, "No record")["issue"][0]  # information is no error
    assert operation_outcome(405, "x")["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize(
    ("fmt", "accept", "expected"),
    [
        (None, XML_CT, XML_CT),
        ("xml", None, XML_CT),
        ("application/fhir+xml", None, XML_CT),
        ("application/fhir xml", None, XML_CT),  # an unencoded "+" arrives as a space
        ("json", XML_CT, FHIR_CT),  # _format wins over Accept
        ("xml", FHIR_CT, XML_CT),
        (None, "application/xml;q=0.9, application/fhir+json;q=0.5", XML_CT),
        (None, "text/html, */*;q=0.1", FHIR_CT),
        (None, "*/*", FHIR_CT),
        (None, "application/json", FHIR_CT),
        (None, None, FHIR_CT),
        (None, "application/fhir+json; fhirVersion=4.0", FHIR_CT),
    ],
)
async def test_format_negotiation(client, fmt, accept, expected):
    await put(client)
    url = f"/fhir/CareTeam?{q()}" + (f"&_format={fmt}" if fmt else "")
    r = await client.get(url, headers={**ED, **({"Accept": accept} if accept else {})})
    assert r.status == 200 and r.content_type == expected, await r.text()
    body = from_xml(await r.text()) if expected == XML_CT else await r.json(content_type=None)
    assert body["resourceType"] == "Bundle" and body["total"] == 1
    assert body["entry"][0]["resource"]["subject"]["identifier"]["value"] == CHILD


async def test_every_fhir_answer_in_xml_equals_the_json(client):
    await put(client)
    cases = [
        ("GET", "/fhir/metadata"),
        ("GET", f"/fhir/CareTeam?{q()}"),
        ("GET", f"/fhir/Flag?{q()}"),
        ("GET", f"/fhir/AuditEvent?{q()}&_include=PractitionerRole"),
        ("GET", "/fhir/Organization/LA001"),
        ("GET", f"/fhir/CareTeam?{q(OTHER)}"),
        ("GET", "/fhir/Encounter/nope"),
        ("DELETE", "/fhir/Flag"),
    ]
    for method, url in cases:
        headers = {**ED, "TraceID": "xml-1"}
        as_json = await client.request(method, url, headers=headers)
        as_xml = await client.request(method, url, headers={**headers, "Accept": XML_CT})
        assert as_xml.status == as_json.status and as_xml.content_type == XML_CT, url
        want, got = normalised(await as_json.json(content_type=None)), from_xml(await as_xml.text())
        if got["resourceType"] == "Bundle":  # a new id per answer
            assert got.pop("id") != want.pop("id")
        assert got == want, url
    r = await client.post(
        "/fhir/Encounter",
        data=orjson.dumps(encounter_body("XML-ENC")),
        headers={**ED, "Content-Type": FHIR_CT, "Accept": XML_CT},
    )
    assert r.status == 201 and from_xml(await r.text())["identifier"][0]["value"] == "XML-ENC"


async def test_encounter_posted_as_xml(client):
    await put(client)
    xml = get_fhir_model_class("Encounter").model_validate(encounter_body("ATT-XML")).model_dump_xml()
    r = await client.post("/fhir/Encounter", data=xml, headers={**ED, "Content-Type": XML_CT})
    body = await fhir_json(r, 201)
    assert body["identifier"][0]["value"] == "ATT-XML" and len(await accesses(client)) == 1


async def test_not_acceptable_is_decided_before_the_access(client):
    await put(client)
    for headers, url in (
        ({"Accept": "text/html"}, f"/fhir/CareTeam?{q()}"),
        ({}, f"/fhir/Flag?{q()}&_format=csv"),
        ({"Accept": "application/fhir+json;q=0, application/xml;q=0"}, f"/fhir/CareTeam?{q()}"),
    ):
        r = await client.get(url, headers={**ED, **headers})
        assert r.status == 406 and r.content_type == FHIR_CT
        assert spine_code(await r.json(content_type=None)) == "UNSUPPORTED_VALUE"
    assert await accesses(client) == [] and await inbox(client, "LA001") == []


async def test_errors_in_the_negotiated_format(client):
    r = await client.get(f"/fhir/CareTeam?{q()}&_format=xml")
    assert r.status == 401 and r.content_type == XML_CT
    outcome = from_xml(await r.text())
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "ACCESS_DENIED"
    r = await client.get("/fhir/CareTeam", headers={**ED, "Accept": XML_CT})
    assert r.status == 400 and from_xml(await r.text())["issue"][0]["details"]["coding"][0]["code"] == (
        "INVALID_SEARCH_DATA"
    )


async def test_statement_and_router_agree_from_both_sides(client):
    """Every advertised interaction, parameter and include is served; every served route is advertised."""
    await put(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    statement = await fhir_json(await client.get("/fhir/metadata"))
    rest = statement["rest"][0]
    assert "application/fhir+xml" in statement["format"] and "xml" in statement["format"]
    assert {c["code"] for s in rest["security"]["service"] for c in s["coding"]} == {"SMART-on-FHIR", "OAuth"}
    advertised = set()
    for res in rest["resource"]:
        names = {p["name"] for p in res.get("searchParam", [])}
        assert "_include" not in names and "patient:identifier" not in names
        for interaction in res["interaction"]:
            advertised.add((res["type"], interaction["code"]))
            if interaction["code"] == "search-type":
                assert names == {"patient", "_format"}, res["type"]
                for fmt in ("json", "xml"):
                    r = await client.get(f"/fhir/{res['type']}?{q()}&_format={fmt}", headers=ED)
                    assert r.status == 200, (res["type"], fmt)
                for include in res.get("searchInclude", []):
                    r = await client.get(f"/fhir/{res['type']}?{q()}", params={"_include": include}, headers=ED)
                    assert r.status == 200, (res["type"], include, await r.text())
            elif interaction["code"] == "read":
                r = await client.get(f"/fhir/{res['type']}/not-there", headers=ED)
                assert r.status == 404 and spine_code(await r.json(content_type=None)) == "RESOURCE_NOT_FOUND"
    routed = set()
    for route in client.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if not path.startswith("/fhir/") or route.method == "HEAD" or path == "/fhir/metadata":
            continue
        kind = path.split("/")[2]
        routed.add((kind, {"POST": "create"}.get(route.method, "read" if "{id}" in path else "search-type")))
    assert routed == advertised
    published = orjson.loads((PROFILES / "CapabilityStatement-cpis-bridge.json").read_bytes())
    assert published["rest"] == statement["rest"]


async def test_referenced_organization_and_practitioner_role_can_be_read(client):
    await put(client)
    bundle = await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    [team] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "CareTeam"]
    [org_entry] = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Organization"]
    ref = team["managingOrganization"][0]["reference"]
    org = await fhir_json(await client.get(f"/fhir/{ref}", headers=ED))
    assert org == org_entry["resource"] and org_entry["fullUrl"].endswith(ref)
    audit = await fhir_json(await client.get(f"/fhir/AuditEvent?{q()}&_include=PractitionerRole", headers=ED2))
    [event] = [e["resource"] for e in audit["entry"] if e["search"]["mode"] == "match"]
    [included] = [e["resource"] for e in audit["entry"] if e["search"]["mode"] == "include"]
    role = await fhir_json(await client.get(f"/fhir/{event['agent'][0]['who']['reference']}", headers=ED2))
    assert role == included and role["practitioner"]["display"] == "Dr Test Example"
    assert role["code"][0]["coding"][0] == {
        "system": "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode",
        "code": "R8000",
        "display": "Clinical Practitioner Access Role",
    }
    reads_audited = await client.app[REDIS].lrange(client.app[KEYS].audit(client.app[KEYS].tag(CHILD)), 0, -1)
    assert len(await accesses(client)) == 1 and reads_audited  # reads of registry data are no accesses


@pytest.mark.parametrize(
    "include",
    [
        "PractitionerRole",
        ASSIGNED,
        "AuditEvent:agent",
        "AuditEvent:agent:PractitionerRole",
        "AuditEvent:entity:PractitionerRole",
    ],
)
async def test_national_includes_of_the_audit_search(client, include):
    await put(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    body = await fhir_json(await client.get(f"/fhir/AuditEvent?{q()}", params={"_include": include}, headers=ED))
    assert [e["resource"]["resourceType"] for e in body["entry"]] == ["AuditEvent", "PractitionerRole"]
    # repeated _include values are one include
    body = await fhir_json(
        await client.get(f"/fhir/AuditEvent?{q()}&_include=PractitionerRole&_include=AuditEvent:agent", headers=ED)
    )
    assert len(body["entry"]) == 2


@pytest.mark.parametrize("param", ["patient:identifier", "patient.identifier"])
async def test_patient_parameter_forms(client, param):
    await put(client)
    body = await fhir_json(await client.get(f"/fhir/Flag?{param}={NHS_SYS}|{CHILD}", headers=ED))
    assert body["total"] == 1


async def test_sds_user_id_and_role_display(client):
    await put(client)
    sds = auth(
        Role.CARE_SETTING, "RXX02", name="Nurse Test Sample", role_code="R8001", extra={"sds_user_id": "555000000017"}
    )
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=sds))
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=ED))
    body = await fhir_json(await client.get(f"/fhir/AuditEvent?{q()}&_include=PractitionerRole", headers=ED))
    events = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"]
    roles = {
        r["organization"]["identifier"]["value"]: r
        for r in (e["resource"] for e in body["entry"] if e["search"]["mode"] == "include")
    }
    nurse = roles["RXX02"]
    assert nurse["practitioner"]["identifier"] == {
        "system": "https://fhir.nhs.uk/Id/sds-user-id",
        "value": "555000000017",
    }
    assert nurse["identifier"] == [nurse["practitioner"]["identifier"]]
    assert nurse["code"][0]["coding"][0]["display"] == "Nurse Access Role"
    assert roles["RXX01"]["practitioner"]["identifier"]["system"] == "https://cpis-bridge.example.org/Id/user"
    by_setting = {ev["source"]["observer"]["identifier"]["value"]: ev for ev in events}
    assert by_setting["RXX02"]["agent"][0]["who"]["identifier"]["system"] == "https://fhir.nhs.uk/Id/sds-user-id"
    assert by_setting["RXX02"]["agent"][0]["role"][0]["coding"][0]["display"] == "Nurse Access Role"
    # a claim that is not an SDS user id (digits) is ignored, never recorded
    odd = auth(Role.CARE_SETTING, "RXX02", extra={"sds_user_id": "not-digits"})
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=odd))
    body = await fhir_json(await client.get(f"/fhir/AuditEvent?{q()}", headers=ED))
    assert "not-digits" not in orjson.dumps(body).decode()


async def test_each_care_setting_sees_only_its_own_identifiers(client):
    await put(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "TraceID": "rxx01-trace"}))
    await fhir_json(
        await client.post(
            "/fhir/Encounter", data=orjson.dumps(encounter_body("RXX02-ATT")), headers={**ED2, "Content-Type": FHIR_CT}
        ),
        201,
    )
    for viewer, own, foreign in ((ED, "rxx01-trace", "RXX02-ATT"), (ED2, "RXX02-ATT", "rxx01-trace")):
        body = await fhir_json(await client.get(f"/fhir/AuditEvent?{q()}&_include=PractitionerRole", headers=viewer))
        text = orjson.dumps(body).decode()
        assert own in text and foreign not in text
        assert body["total"] == 2  # both accesses are listed, who and when, for every setting


async def test_unscheduled_event_alias_and_header_echoes(client):
    await put(client)
    r = await client.get(
        f"/fhir/CareTeam?{q()}", headers={**ED, "IsUnscheduledEvent": "false", "X-Correlation-ID": "corr-123"}
    )
    await fhir_json(r)
    assert r.headers["X-Correlation-ID"] == "corr-123"
    assert await accesses(client) == []  # the alias made it a scheduled (silent) read
    r = await client.get(
        f"/fhir/CareTeam?{q()}", headers={**ED, "IsUnscheduledEvent": "true", "IsUnscheduledAccessEvent": "false"}
    )
    assert r.status == 400  # the two disagree: refused, never guessed
    r = await client.get("/fhir/Patient", headers={**ED, "X-Correlation-ID": "corr-err"})
    assert r.status == 404 and r.headers["X-Correlation-ID"] == "corr-err"
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "IsUnscheduledEvent": "true"}))
    assert len(await accesses(client)) == 1


async def test_session_urid_is_recorded_in_the_audit(client):
    await put(client)
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "NHSD-Session-URID": "555254240100"}))
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers={**ED, "NHSD-Session-URID": "9" * 80}))
    keys = client.app[KEYS]
    entries = [orjson.loads(e) for e in await client.app[REDIS].lrange(keys.audit(keys.tag(CHILD)), 0, -1)]
    lookups = [e for e in entries if e["action"] == "lookup.careteam"]
    assert [e.get("sessionUrid") for e in lookups] == [None, "555254240100"]  # newest first


async def test_xml_answers_survive_characters_xml_cannot_carry(client):
    await put(client)
    odd = auth(Role.CARE_SETTING, "RXX02", name="Dr \x01Odd\x0bName")
    await fhir_json(await client.get(f"/fhir/CareTeam?{q()}", headers=odd))
    r = await client.get(f"/fhir/AuditEvent?{q()}&_include=PractitionerRole&_format=xml", headers=ED)
    assert r.status == 200, await r.text()
    body = from_xml(await r.text())
    assert body["entry"][0]["resource"]["agent"][0]["who"]["display"] == "Dr \ufffdOdd\ufffdName"
