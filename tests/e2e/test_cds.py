"""CDS Hooks 2.0 over HTTP: discovery, cards, accesses by hook and care-setting type, prefetch from fhirServer (a
real aiohttp FHIR double), and the production token path (RS384 client keys served by a test JWKS server)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from cpis_bridge.app import create_app
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.core.records import today_london
from cpis_bridge.web.state import KEYS, RECORDS, REDIS
from tests.conftest import DEV_SECRET, ED, GP, LA1, LA2, auth, record

NHS_SYS = "https://fhir.nhs.uk/Id/nhs-number"
CHILD = "9990000018"
ES = "/cds-services/cpis-encounter-start"
PV = "/cds-services/cpis-patient-view"


def patient(nhs: str = CHILD) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "pat-1", "identifier": [
        {"system": "https://ehr.example/Id/mrn", "value": "MRN-1"}, {"system": NHS_SYS, "value": nhs}]}


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
        assert s["prefetch"] == {"patient": "Patient/{{context.patientId}}"}
        assert s["description"] and s["title"]


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
        assert card["indicator"] == "warning" and card["source"]["label"]
        assert len(card["summary"]) < 140 and uuid.UUID(card["uuid"])
    assert CHILD not in orjson.dumps(body).decode()
    by_la = {("Example Borough" in c["summary"]): c for c in cards}
    cpp, lac = by_la[True], by_la[False]
    assert cpp["summary"].startswith("Child Protection Plan") and "Example Borough Council" in cpp["summary"]
    assert "2026-01-10" in cpp["detail"] and "2026-03-01" in cpp["detail"]
    assert "0300 000 0001" in cpp["detail"] and "0300 000 0002" in cpp["detail"]
    assert lac["summary"].startswith("Looked After Child") and "Sample County Council" in lac["summary"]
    assert "0300 000 0011" in lac["detail"] and "0300 000 0012" in lac["detail"]
    [acc] = await accesses(client.app)
    assert acc.split("\x1f")[:2] == ["RXX01", "enc-1"]
    for la in ("LA001", "LA002"):
        assert await client.app[REDIS].xlen(client.app[KEYS].inbox(la)) == 1


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


async def test_prefetch_fetched_from_fhir_server_or_412(client, aiohttp_server):
    await put(client)
    seen: list[str | None] = []

    async def read_patient(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.match_info["id"] != "pat-1":
            return web.json_response({"resourceType": "OperationOutcome"}, status=404)
        return web.Response(body=orjson.dumps(patient()), content_type="application/fhir+json")

    ehr = web.Application()
    ehr.router.add_get("/r4/Patient/{id}", read_patient)
    server = await aiohttp_server(ehr)
    fhir_server = str(server.make_url("/r4"))
    body = hook("encounter-start", prefetch=None, fhirServer=fhir_server,
                fhirAuthorization={"access_token": "ehr-token", "token_type": "Bearer", "expires_in": 300,
                                   "scope": "patient/Patient.read", "subject": "cpis"})
    r = await client.post(ES, json=body, headers=ED)
    assert r.status == 200 and len((await r.json())["cards"]) == 1
    assert seen == ["Bearer ehr-token"]
    body = hook("encounter-start", prefetch={"patient": None}, fhirServer=fhir_server)
    body["context"]["patientId"] = "unknown"
    r = await client.post(ES, json=body, headers=ED)
    assert r.status == 412 and r.content_type == "application/problem+json"
    r = await client.post(ES, json=hook("encounter-start", prefetch=None), headers=ED)
    assert r.status == 412
    r = await client.post(ES, json=hook("encounter-start", prefetch=None, fhirServer="http://127.0.0.1:9/r4"),
                          headers=ED)
    assert r.status == 412


@pytest.mark.parametrize("path,body,headers,status", [
    (ES, hook("encounter-start"), {}, 401),
    (ES, hook("encounter-start"), LA1, 403),
    ("/cds-services/unknown", hook("encounter-start"), ED, 404),
    (ES, hook("patient-view"), ED, 400),
    (ES, {"hook": "encounter-start", "context": {}}, ED, 400),
])
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
async def production(aiohttp_server, aiohttp_client, make_settings, rsa_key, tmp_path: Path):
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
        + f'cdsClients:\n  - {{iss: "{ISS}", jwksUrl: "{jwks_url}", ods: RXX01}}\n'
    )
    settings = make_settings(registry=registry, auth_jwks_url=jwks_url, auth_issuer="https://idp.example.test",
                             public_base_url=PUBLIC)
    assert not settings.dev_mode
    client = await aiohttp_client(create_app(settings))
    la_ctx = AuditContext(Principal("la-user", Role.LOCAL_AUTHORITY, "LA001"))
    await client.app[RECORDS].put(la_ctx, "LA001", "CASE-1", record())
    client.hits = hits
    return client


def cds_token(key: Any, *, aud: str = PUBLIC + ES, iss: str = ISS, alg: str = "RS384", kid: str = "ehr-key-1",
              **claims: Any) -> dict[str, str]:
    now = int(time.time())
    payload = {"iss": iss, "aud": aud, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()),
               "sub": "ehr-user-1", "name": "Dr Test Example", **claims}
    return {"Authorization": f"Bearer {jwt.encode(payload, key, algorithm=alg, headers={'kid': kid})}"}


async def test_production_cds_client_token_rs384(production, rsa_key):
    r = await production.post(ES, json=hook("encounter-start"), headers=cds_token(rsa_key))
    assert r.status == 200, await r.text()
    assert len((await r.json())["cards"]) == 1
    [acc] = await accesses(production.app)
    fields = acc.split("\x1f")
    assert fields[0] == "RXX01" and fields[4] == "ehr-user-1" and fields[5] == "Dr Test Example"
    assert production.hits


async def test_production_rejects_bad_cds_tokens(production, rsa_key):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = [
        cds_token(other_key),                                    # wrong key
        cds_token(rsa_key, aud=PUBLIC + PV),                     # token for another service
        cds_token(rsa_key, iss="https://unknown.example"),       # issuer not in the registry
        cds_token(rsa_key, exp=int(time.time()) - 3600),         # expired
        cds_token(DEV_SECRET, alg="HS256"),                      # HMAC in production
        auth(Role.CARE_SETTING, "RXX01"),                        # a dev token
    ]
    for headers in bad:
        r = await production.post(ES, json=hook("encounter-start"), headers=headers)
        assert r.status == 401, await r.text()
    token = cds_token(rsa_key)
    unsigned = jwt.encode(jwt.decode(token["Authorization"][7:], options={"verify_signature": False}), None,
                          algorithm="none")
    r = await production.post(ES, json=hook("encounter-start"), headers={"Authorization": f"Bearer {unsigned}"})
    assert r.status == 401
    payload = jwt.decode(token["Authorization"][7:], options={"verify_signature": False})
    del payload["jti"]
    r = await production.post(ES, json=hook("encounter-start"),
                              headers={"Authorization": "Bearer " + jwt.encode(payload, rsa_key, algorithm="RS384",
                                                                              headers={"kid": "ehr-key-1"})})
    assert r.status == 401
    assert await accesses(production.app) == []
