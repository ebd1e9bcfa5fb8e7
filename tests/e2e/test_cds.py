"""CDS Hooks 2.0 over HTTP: discovery, cards, accesses by hook and care-setting type, prefetch from fhirServer (a
real aiohttp FHIR double), and the production token path (RS384 client keys served by a test JWKS server)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from cpis_bridge.app import KEYS, REDIS, create_app
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import LONDON, today_london
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.web.state import SERVICES
from tests.e2e.test_fhir_api import commandstats
from tests.support.world import DEV_SECRET, ED, GP, LA1, LA2, REGISTRY, auth, record

NHS_SYS = "https://fhir.nhs.uk/Id/nhs-number"
CHILD = "9990000018"
ES = "/cds-services/cpis-encounter-start"
PV = "/cds-services/cpis-patient-view"


def patient(nhs: str = CHILD) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [{"system": "https://ehr.example/Id/mrn", "value": "MRN-1"}, {"system": NHS_SYS, "value": nhs}],
    }


def hook(name: str, *, encounter: str | None = "enc-1", prefetch: Any = "default", **extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {"userId": "PractitionerRole/pr-1", "patientId": "pat-1"}
    if encounter is not None:
        context["encounterId"] = encounter
    body: dict[str, Any] = {"hook": name, "hookInstance": str(uuid.uuid4()), "context": context}
    if prefetch == "default":
        body["prefetch"] = {"patient": patient()}
    elif prefetch is not None:
        body["prefetch"] = prefetch
    body.update(extra)
    return body


async def accesses(app: web.Application, nhs: str = CHILD) -> list[str]:
    keys = app[KEYS]
    return await app[REDIS].lrange(keys.accesses(keys.tag(nhs)), 0, -1)


async def put(client: Any, lid: str = "CASE-1", headers: dict[str, str] = LA1, **kw: Any) -> None:
    r = await client.put(f"/v1/records/{lid}", json=record(lid, **kw), headers=headers)
    assert r.status == 201, await r.text()


async def test_discovery_is_public(client):
    r = await client.get("/cds-services")
    assert r.status == 200 and r.content_type == "application/json"
    services = {s["id"]: s for s in (await r.json())["services"]}
    assert services["cpis-patient-view"]["hook"] == "patient-view"
    assert services["cpis-encounter-start"]["hook"] == "encounter-start"
    for s in services.values():
        assert s["prefetch"]["patient"] == "Patient/{{context.patientId}}"
        assert s["prefetch"]["user"] == "{{context.userId}}"  # optional: names the clinician to the LA
        assert s["description"] and s["title"]
    assert services["cpis-encounter-start"]["prefetch"]["encounter"] == "Encounter/{{context.encounterId}}"


async def test_encounter_start_cards_and_one_access_per_encounter(client):
    await put(client, "A-1", endDate="2026-03-01")
    await put(client, "B-1", headers=LA2, planType="LAC", lacLegalBasis="s31")
    for _ in range(2):
        r = await client.post(ES, json=hook("encounter-start"), headers=ED)
        assert r.status == 200, await r.text()
        body = await r.json()
    cards = body["cards"]
    assert len(cards) == 2
    for card in cards:
        assert card["source"]["label"]
        assert len(card["summary"]) <= 140 and uuid.UUID(card["uuid"])
    assert CHILD not in orjson.dumps(body).decode()
    by_la = {("Example Borough" in c["summary"]): c for c in cards}
    cpp, lac = by_la[True], by_la[False]
    # an ended plan (still inside its display window) is information, and says when it ended
    assert cpp["summary"] == "Child Protection Plan - Example Borough Council Children's Services, ended 1 March 2026"
    assert cpp["indicator"] == "info"
    assert "Started 10 January 2026; ended 1 March 2026." in cpp["detail"]
    assert "0300 000 0001" in cpp["detail"] and "0300 000 0002" in cpp["detail"]
    assert lac["summary"] == "Looked After Child - Sample County Council Children's Social Care"
    assert lac["indicator"] == "warning" and "Started 10 January 2026; no end date." in lac["detail"]
    assert "0300 000 0011" in lac["detail"] and "0300 000 0012" in lac["detail"]
    [acc] = await accesses(client.app)
    assert acc.split("\x1f")[:2] == ["RXX01", "enc-1"]
    for la in ("LA001", "LA002"):
        assert await client.app[REDIS].xlen(client.app[KEYS].inbox(la)) == 1


def detail_lines(card: dict[str, Any]) -> list[str]:
    return card["detail"].split("\n")


@pytest.mark.no_relays  # counts the service's Redis commands
async def test_card_lists_recent_visits_newest_first_from_the_same_store_step(client):
    await put(client)
    ed2 = auth(Role.CARE_SETTING, "RXX02")
    for i in range(27):  # 27 earlier visits, alternating settings; the card shows the newest 25 with this one
        r = await client.get(
            f"/fhir/CareTeam?patient:identifier={NHS_SYS}|{CHILD}",
            headers={**(ED if i % 2 else ed2), "TraceID": f"visit-{i}"},
        )
        assert r.status == 200
    before = await commandstats(client)
    r = await client.post(ES, json=hook("encounter-start", encounter="enc-now"), headers=ED)
    after = await commandstats(client)
    [card] = (await r.json())["cards"]
    lines = detail_lines(card)
    start = lines.index("Recent unscheduled visits (25, newest first):")
    visits = lines[start + 1 : start + 26]
    assert len(visits) == 25 and all(v.startswith("- ") for v in visits) and lines[start + 26] == ""
    assert visits[0].endswith(": Example Hospital Emergency Department")  # this visit
    assert visits[1].endswith(": Example Urgent Treatment Centre")  # visit-26
    assert visits[2].endswith(": Example Hospital Emergency Department")  # visit-25
    now = dt.datetime.now(LONDON)
    assert visits[0].startswith(f"- {now:%A} {now.day} {now:%B} {now.year}, ")
    # the visits came back from the access step itself: one EVALSHA, no other command from the service
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    delta.pop("cmdstat_info", None)
    assert delta.pop("cmdstat_evalsha") == 1, delta
    assert set(delta) <= {f"cmdstat_{c}" for c in ("hgetall", "lrange", "lpush", "ltrim", "hget", "hset", "xadd")}


async def test_card_ring_now_follows_the_la_office_hours(aiohttp_client, make_settings, tmp_path):
    text = (
        REGISTRY.read_text()
        .replace(
            'emergencyDutyPhone: "0300 000 0002"\n',
            'emergencyDutyPhone: "0300 000 0002"\n    officeHours: {days: [], open: "09:00", close: "17:00"}\n',
        )
        .replace(
            'emergencyDutyPhone: "0300 000 0012"\n',
            'emergencyDutyPhone: "0300 000 0012"\n    officeHours: {days: [Mon, Tue, Wed, Thu, Fri, Sat, Sun], '
            'open: "00:00", close: "24:00", bankHolidays: open}\n',
        )
    )
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    client = await aiohttp_client(create_app(make_settings(registry=path)))
    await put(client)
    await put(client, "B-1", headers=LA2)
    r = await client.post(PV, json=hook("patient-view"), headers=GP)  # a silent look-up: still shows the numbers
    cards = {c["summary"][24:30]: c for c in (await r.json())["cards"]}
    closed, open_ = detail_lines(cards["Exampl"]), detail_lines(cards["Sample"])
    assert "Ring now: **0300 000 0002** (Emergency duty (out of hours))" in closed
    assert "Other number: 0300 000 0001 (Office hours)" in closed
    assert "Ring now: **0300 000 0011** (Office hours)" in open_
    assert "No unscheduled visits are recorded." in closed


async def test_encounter_start_more_than_5_minutes_ahead_is_refused(client):
    await put(client)
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)).isoformat()
    r = await client.post(
        ES,
        json=hook(
            "encounter-start",
            prefetch={"patient": patient(), "encounter": {"resourceType": "Encounter", "period": {"start": soon}}},
        ),
        headers=ED,
    )
    assert r.status == 200
    [acc] = await accesses(client.app)
    assert acc.split("\x1f")[3]  # the arrival time was kept
    for start in (
        "2030-01-01T09:00:00Z",
        "2030-01-01",
        (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)).isoformat(),
    ):
        r = await client.post(
            ES,
            json=hook(
                "encounter-start",
                encounter="enc-2",
                prefetch={"patient": patient(), "encounter": {"resourceType": "Encounter", "period": {"start": start}}},
            ),
            headers=ED,
        )
        assert r.status == 400 and r.content_type == "application/problem+json"
        assert "5 minutes" in (await r.json())["detail"]
    assert len(await accesses(client.app)) == 1


async def test_encounter_start_is_unscheduled_whatever_the_header(client):
    await put(client)
    r = await client.post(ES, json=hook("encounter-start"), headers={**ED, "IsUnscheduledAccessEvent": "false"})
    assert r.status == 200
    assert len(await accesses(client.app)) == 1


async def test_patient_view_follows_the_care_setting_type(client):
    await put(client)
    r = await client.post(PV, json=hook("patient-view", encounter=None), headers=GP)
    assert r.status == 200 and len((await r.json())["cards"]) == 1
    assert await accesses(client.app) == []
    for _ in range(2):
        r = await client.post(PV, json=hook("patient-view", encounter=None), headers=ED)
        assert len((await r.json())["cards"]) == 1
    [acc] = await accesses(client.app)
    assert acc.split("\x1f")[1] == f"patient-view:{today_london().isoformat()}"
    r = await client.post(PV, json=hook("patient-view", encounter="enc-9"), headers=ED)
    assert r.status == 200
    history = await accesses(client.app)
    assert [a.split("\x1f")[1] for a in history] == ["patient-view:enc-9", f"patient-view:{today_london().isoformat()}"]
    assert all(CHILD not in a for a in history)


async def test_no_record_is_empty_cards_and_keeps_nothing(client):
    r = await client.post(ES, json=hook("encounter-start", prefetch={"patient": patient("9990000026")}), headers=ED)
    assert r.status == 200 and await r.json() == {"cards": []}
    assert await accesses(client.app, "9990000026") == []
    no_nhs = {"resourceType": "Patient", "identifier": [{"system": "https://ehr.example/Id/mrn", "value": "M"}]}
    r = await client.post(PV, json=hook("patient-view", prefetch={"patient": no_nhs}), headers=ED)
    assert r.status == 200 and await r.json() == {"cards": []}


class Ehr:
    """A real FHIR server double for an EHR: serves Patient/pat-1 and PractitionerRole/pr-123, records each request's
    path and Authorization header."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.app = web.Application()
        self.app.router.add_get("/r4/{type}/{id}", self.read)
        self.url = ""

    async def read(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, request.headers.get("Authorization")))
        kind, rid = request.match_info["type"], request.match_info["id"]
        if (kind, rid) == ("Patient", "pat-1"):
            return web.Response(body=orjson.dumps(patient()), content_type="application/fhir+json")
        if (kind, rid) == ("PractitionerRole", "pr-123"):
            return web.Response(body=orjson.dumps(ROLE), content_type="application/fhir+json")
        return web.json_response({"resourceType": "OperationOutcome"}, status=404)


ROLE = {
    "resourceType": "PractitionerRole",
    "id": "pr-123",
    "practitioner": {"reference": "Practitioner/p-9", "display": "Dr Jane Example"},
    "code": [
        {
            "coding": [
                {
                    "system": "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode",
                    "code": "R8000",
                    "display": "Clinical Practitioner Access Role",
                }
            ]
        }
    ],
}
FHIR_AUTH = {
    "access_token": "ehr-token",
    "token_type": "Bearer",
    "expires_in": 300,
    "scope": "patient/Patient.read user/PractitionerRole.read",
    "subject": "cpis",
}


@pytest.fixture
async def ehrs(aiohttp_server) -> tuple[Ehr, Ehr]:
    """Two EHR FHIR servers: the first registered for the care setting RXX01 (and the CDS client), the second not."""
    out = []
    for _ in range(2):
        ehr = Ehr()
        server = await aiohttp_server(ehr.app)
        ehr.url = str(server.make_url("/r4"))
        out.append(ehr)
    return out[0], out[1]


def registered(tmp_path: Path, origin: str, extra: str = "") -> Path:
    text = REGISTRY.read_text().replace(
        "{ods: RXX01, name: Example Hospital Emergency Department, type: ED, unscheduled: true}",
        f"{{ods: RXX01, name: Example Hospital Emergency Department, type: ED, unscheduled: true, "
        f'fhirServers: ["{origin}"]}}',
    )
    path = tmp_path / "registry.yaml"
    path.write_text(text + extra)
    return path


@pytest.fixture
async def ehr_client(aiohttp_client, make_settings, tmp_path, ehrs):
    good, _ = ehrs
    settings = make_settings(registry=registered(tmp_path, good.url.removesuffix("/r4")), relays=False)
    client = await aiohttp_client(create_app(settings))
    await put(client)
    return client


async def test_prefetch_fetched_only_from_a_registered_fhir_server_or_412(ehr_client, ehrs):
    client, (good, bad) = ehr_client, ehrs
    body = hook("encounter-start", prefetch=None, fhirServer=good.url, fhirAuthorization=FHIR_AUTH)
    r = await client.post(ES, json=body, headers=ED)
    assert r.status == 200 and len((await r.json())["cards"]) == 1
    assert good.seen == [("/r4/Patient/pat-1", "Bearer ehr-token"), ("/r4/PractitionerRole/pr-1", "Bearer ehr-token")]
    # an origin not registered for this caller is never called, and never sees the access token
    for server in (bad.url, bad.url.replace("127.0.0.1", "localhost"), good.url.replace("http://", "https://")):
        body = hook("encounter-start", encounter="enc-2", prefetch=None, fhirServer=server, fhirAuthorization=FHIR_AUTH)
        r = await client.post(ES, json=body, headers=ED)
        assert r.status == 412 and r.content_type == "application/problem+json"
    # with the prefetch given, an unregistered fhirServer is simply not used
    body = hook("encounter-start", encounter="enc-3", fhirServer=bad.url, fhirAuthorization=FHIR_AUTH)
    body["context"]["userId"] = "PractitionerRole/pr-123"
    r = await client.post(ES, json=body, headers=ED)
    assert r.status == 200 and len((await r.json())["cards"]) == 1
    assert bad.seen == []
    body = hook("encounter-start", prefetch={"patient": None}, fhirServer=good.url)
    body["context"]["patientId"] = "unknown"
    r = await client.post(ES, json=body, headers=ED)
    assert r.status == 412
    r = await client.post(ES, json=hook("encounter-start", prefetch=None), headers=ED)
    assert r.status == 412


async def notified_user(client: Any, la_headers: dict[str, str] = LA1) -> dict[str, Any]:
    page = await (await client.get("/v1/notifications", headers=la_headers)).json()
    return page["notifications"][-1]["access"]["user"]


async def last_audit(client: Any, nhs: str = CHILD) -> dict[str, Any]:
    keys = client.app[KEYS]
    return orjson.loads(await client.app[REDIS].lindex(keys.audit(keys.tag(nhs)), 0))


async def test_the_la_is_told_the_clinician_from_context_user_id(ehr_client, ehrs):
    client, (good, _) = ehr_client, ehrs
    # from the user prefetch
    body = hook("encounter-start", prefetch={"patient": patient(), "user": ROLE})
    body["context"]["userId"] = "PractitionerRole/pr-123"
    r = await client.post(ES, json=body, headers=ED)
    assert r.status == 200
    [acc] = await accesses(client.app)
    assert acc.split("\x1f")[4:] == ["PractitionerRole/pr-123", "Dr Jane Example", "R8000"]
    assert await notified_user(client) == {
        "id": "PractitionerRole/pr-123",
        "name": "Dr Jane Example",
        "roleCode": "R8000",
    }
    audit = await last_audit(client)
    assert (audit["actor"], audit["actorName"], audit["roleCode"]) == (
        "PractitionerRole/pr-123",
        "Dr Jane Example",
        "R8000",
    )
    assert audit["via"] == "dev-care-setting-RXX01"  # the calling system is kept beside the clinician
    # from the registered fhirServer when there is no user prefetch
    body = hook("encounter-start", encounter="enc-2", fhirServer=good.url, fhirAuthorization=FHIR_AUTH)
    body["context"]["userId"] = "PractitionerRole/pr-123"
    assert (await client.post(ES, json=body, headers=ED)).status == 200
    assert good.seen == [("/r4/PractitionerRole/pr-123", "Bearer ehr-token")]
    assert (await accesses(client.app))[0].split("\x1f")[4:] == ["PractitionerRole/pr-123", "Dr Jane Example", "R8000"]
    # a Practitioner prefetch; a prefetch for somebody else is not believed
    body = hook(
        "encounter-start",
        encounter="enc-3",
        prefetch={
            "patient": patient(),
            "user": {
                "resourceType": "Practitioner",
                "id": "p-9",
                "name": [{"prefix": ["Dr"], "given": ["Jane"], "family": "Example"}],
            },
        },
    )
    body["context"]["userId"] = "Practitioner/p-9"
    assert (await client.post(ES, json=body, headers=ED)).status == 200
    assert (await accesses(client.app))[0].split("\x1f")[4:] == ["Practitioner/p-9", "Dr Jane Example", ""]
    body = hook("encounter-start", encounter="enc-4", prefetch={"patient": patient(), "user": {**ROLE, "id": "x"}})
    body["context"]["userId"] = "PractitionerRole/pr-123"
    assert (await client.post(ES, json=body, headers=ED)).status == 200
    assert (await accesses(client.app))[0].split("\x1f")[4:] == ["PractitionerRole/pr-123", "", ""]
    # no userId: the token's subject, as before
    body = hook("encounter-start", encounter="enc-5")
    del body["context"]["userId"]
    assert (await client.post(ES, json=body, headers=ED)).status == 200
    assert (await accesses(client.app))[0].split("\x1f")[4:] == ["dev-care-setting-RXX01", "Dr Test Example", "R8000"]
    assert "via" not in await last_audit(client)
    body = hook("encounter-start", encounter="enc-6")
    body["context"]["userId"] = "DROP TABLE"
    assert (await client.post(ES, json=body, headers=ED)).status == 400


async def test_feedback_is_accepted_and_audited_as_codes_only(client):
    item = {
        "card": str(uuid.uuid4()),
        "outcome": "overridden",
        "outcomeTimestamp": "2026-12-03T10:15:00Z",
        "overrideReason": {
            "reason": {"system": "https://ehr.example/override", "code": "already-known", "display": "Already known"},
            "userComment": "free text about the child",
        },
    }
    accepted = {"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2026-12-03T10:16:00+00:00"}
    r = await client.post(f"{ES}/feedback", json={"feedback": [item, accepted]}, headers=ED)
    assert r.status == 200, await r.text()
    [entry] = [orjson.loads(e) for e in await client.app[REDIS].lrange(client.app[KEYS].system_audit, 0, -1)]
    assert entry["action"] == "cds.feedback" and entry["org"] == "RXX01"
    assert entry["detail"] == {
        "service": "cpis-encounter-start",
        "feedback": [
            {
                "card": item["card"],
                "outcome": "overridden",
                "outcomeTimestamp": "2026-12-03T10:15:00Z",
                "overrideReason": "https://ehr.example/override|already-known",
            },
            {"card": accepted["card"], "outcome": "accepted", "outcomeTimestamp": "2026-12-03T10:16:00Z"},
        ],
    }
    assert "free text" not in orjson.dumps(entry).decode() and "Already known" not in orjson.dumps(entry).decode()
    for body, status in [
        ({"feedback": []}, 400),
        ({"feedback": [{**item, "outcome": "ignored"}]}, 400),
        ({"feedback": [{"card": "x", "outcome": "accepted"}]}, 400),
        ([], 400),
    ]:
        r = await client.post(f"{ES}/feedback", json=body, headers=ED)
        assert r.status == status and r.content_type == "application/problem+json"
    assert (await client.post("/cds-services/unknown/feedback", json={"feedback": [item]}, headers=ED)).status == 404
    assert (await client.post(f"{PV}/feedback", json={"feedback": [item]})).status == 401
    assert (await client.post(f"{PV}/feedback", json={"feedback": [item]}, headers=LA1)).status == 403


@pytest.mark.parametrize(
    "path,body,headers,status",
    [
        (ES, hook("encounter-start"), {}, 401),
        (ES, hook("encounter-start"), LA1, 403),
        ("/cds-services/unknown", hook("encounter-start"), ED, 404),
        (ES, hook("patient-view"), ED, 400),
        (ES, {"hook": "encounter-start", "context": {}}, ED, 400),
    ],
)
async def test_bad_calls(client, path, body, headers, status):
    r = await client.post(path, json=body, headers=headers)
    assert r.status == status
    assert r.content_type == "application/problem+json"


async def test_body_over_1_mib_is_413(client):
    big = hook("encounter-start", extension={"padding": "x" * (1024 * 1024 + 1)})
    r = await client.post(ES, data=orjson.dumps(big), headers={**ED, "Content-Type": "application/json"})
    assert r.status == 413


# -- production: CDS client tokens verified against the client's JWKS ---------------------------------------------

ISS = "https://ehr.rxx.example"
PUBLIC = "https://cpis.example.test"


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def production(aiohttp_server, aiohttp_client, make_settings, rsa_key, tmp_path: Path, ehrs):
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    jwk.update(kid="ehr-key-1", alg="RS384", use="sig")
    hits: list[int] = []

    async def jwks(request: web.Request) -> web.Response:
        hits.append(1)
        return web.json_response({"keys": [jwk]})

    keys_app = web.Application()
    keys_app.router.add_get("/.well-known/jwks.json", jwks)
    key_server = await aiohttp_server(keys_app)
    jwks_url = str(key_server.make_url("/.well-known/jwks.json"))
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        (Path(__file__).parents[1] / "data" / "registry.yaml").read_text()
        + f'cdsClients:\n  - {{iss: "{ISS}", jwksUrl: "{jwks_url}", ods: RXX01, '
        f'fhirServers: ["{ehrs[0].url.removesuffix("/r4")}"]}}\n'
    )
    settings = make_settings(
        registry=registry,
        auth_jwks_url=jwks_url,
        auth_issuer="https://idp.example.test",
        auth_audience="cpis-bridge-test",
        public_base_url=PUBLIC,
    )
    assert not settings.dev_mode
    client = await aiohttp_client(create_app(settings))
    la_ctx = AuditContext(Principal("la-user", Role.LOCAL_AUTHORITY, "LA001"))
    await client.app[SERVICES].records.put(la_ctx, "LA001", "CASE-1", record())
    client.hits = hits
    return client


def cds_token(
    key: Any, *, aud: str = PUBLIC + ES, iss: str = ISS, alg: str = "RS384", kid: str = "ehr-key-1", **claims: Any
) -> dict[str, str]:
    now = int(time.time())
    payload = {
        "iss": iss,
        "aud": aud,
        "exp": now + 300,
        "iat": now,
        "jti": str(uuid.uuid4()),
        "sub": "ehr-client",
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    return {"Authorization": f"Bearer {jwt.encode(payload, key, algorithm=alg, headers={'kid': kid})}"}


async def test_production_cds_client_token_rs384(production, rsa_key):
    r = await production.post(ES, json=hook("encounter-start"), headers=cds_token(rsa_key))
    assert r.status == 200, await r.text()
    assert len((await r.json())["cards"]) == 1
    [acc] = await accesses(production.app)
    fields = acc.split("\x1f")
    assert fields[0] == "RXX01" and fields[4] == "PractitionerRole/pr-1"  # the clinician, not the EHR (ehr-client)
    assert (await last_audit(production))["via"] == "ehr-client"
    assert production.hits


async def test_production_cds_client_without_user_id_is_the_token_subject(production, rsa_key):
    body = hook("encounter-start")
    del body["context"]["userId"]
    r = await production.post(ES, json=body, headers=cds_token(rsa_key, name="EHR System"))
    assert r.status == 200
    assert (await accesses(production.app))[0].split("\x1f")[4:6] == ["ehr-client", "EHR System"]


async def test_production_fhir_server_only_at_the_clients_registered_origins(production, rsa_key, ehrs):
    good, bad = ehrs
    body = hook("encounter-start", prefetch=None, fhirServer=good.url, fhirAuthorization=FHIR_AUTH)
    body["context"]["userId"] = "PractitionerRole/pr-123"
    r = await production.post(ES, json=body, headers=cds_token(rsa_key))
    assert r.status == 200, await r.text()
    assert {p for p, _ in good.seen} == {"/r4/Patient/pat-1", "/r4/PractitionerRole/pr-123"}
    assert (await accesses(production.app))[0].split("\x1f")[4:] == [
        "PractitionerRole/pr-123",
        "Dr Jane Example",
        "R8000",
    ]
    body = hook("encounter-start", encounter="enc-2", prefetch=None, fhirServer=bad.url, fhirAuthorization=FHIR_AUTH)
    r = await production.post(ES, json=body, headers=cds_token(rsa_key))
    assert r.status == 412
    assert bad.seen == []


async def test_production_jti_replay_and_long_lived_tokens_are_refused(production, rsa_key):
    token = cds_token(rsa_key)
    assert (await production.post(ES, json=hook("encounter-start"), headers=token)).status == 200
    r = await production.post(ES, json=hook("encounter-start", encounter="enc-2"), headers=token)
    assert r.status == 401 and r.content_type == "application/problem+json"
    # the same jti from another issuer would be its own; a new jti is fine
    assert (
        await production.post(ES, json=hook("encounter-start", encounter="enc-3"), headers=cds_token(rsa_key))
    ).status == 200
    now = int(time.time())
    for claims in (
        {"iat": now, "exp": now + 301},
        {"iat": now - 600, "exp": now + 60},
        {"iat": None},
        {"iat": now + 3600, "exp": now + 3700},
    ):
        r = await production.post(
            ES, json=hook("encounter-start", encounter="enc-4"), headers=cds_token(rsa_key, **claims)
        )
        assert r.status == 401, claims
    assert len(await accesses(production.app)) == 2


async def test_production_feedback_with_the_services_audience(production, rsa_key):
    item = {"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2026-12-03T10:15:00Z"}
    for aud in (PUBLIC + ES, PUBLIC + ES + "/feedback"):
        r = await production.post(f"{ES}/feedback", json={"feedback": [item]}, headers=cds_token(rsa_key, aud=aud))
        assert r.status == 200, await r.text()
    r = await production.post(f"{ES}/feedback", json={"feedback": [item]}, headers=cds_token(rsa_key, aud=PUBLIC + PV))
    assert r.status == 401


async def test_production_rejects_bad_cds_tokens(production, rsa_key):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = [
        cds_token(other_key),  # wrong key
        cds_token(rsa_key, aud=PUBLIC + PV),  # token for another service
        cds_token(rsa_key, iss="https://unknown.example"),  # issuer not in the registry
        cds_token(rsa_key, exp=int(time.time()) - 3600),  # expired
        cds_token(DEV_SECRET, alg="HS256"),  # HMAC in production
        auth(Role.CARE_SETTING, "RXX01"),  # a dev token
    ]
    for headers in bad:
        r = await production.post(ES, json=hook("encounter-start"), headers=headers)
        assert r.status == 401, await r.text()
    token = cds_token(rsa_key)
    unsigned = jwt.encode(
        jwt.decode(token["Authorization"][7:], options={"verify_signature": False}), None, algorithm="none"
    )
    r = await production.post(ES, json=hook("encounter-start"), headers={"Authorization": f"Bearer {unsigned}"})
    assert r.status == 401
    payload = jwt.decode(token["Authorization"][7:], options={"verify_signature": False})
    del payload["jti"]
    r = await production.post(
        ES,
        json=hook("encounter-start"),
        headers={
            "Authorization": "Bearer " + jwt.encode(payload, rsa_key, algorithm="RS384", headers={"kid": "ehr-key-1"})
        },
    )
    assert r.status == 401
    assert await accesses(production.app) == []
