"""The local-authority records API over HTTP (docs/contract.md §4): create, replace, read, list, erase, errors."""

import orjson

from tests.support.world import ED, LA1, LA2, OPS, record


async def test_create_then_replace_bumps_version(client):
    r = await client.put("/v1/records/CASE-1", json=record(), headers=LA1)
    assert r.status == 201, await r.text()
    assert r.headers["Location"] == "/v1/records/CASE-1"
    body = await r.json()
    assert body["version"] == 1 and body["visible"] is True and body["updatedAt"].endswith("Z")
    assert {k for k in body} >= {
        "localId",
        "planType",
        "nhsNumber",
        "dateOfBirth",
        "startDate",
        "endDate",
        "deleteDate",
        "expectedDeliveryDate",
        "lacLegalBasis",
        "givenName",
        "familyName",
    }
    r = await client.put("/v1/records/CASE-1", json=record(endDate="2026-02-01"), headers=LA1)
    assert r.status == 200
    assert (await r.json())["version"] == 2
    # An identical re-send changes nothing: same version.
    r = await client.put("/v1/records/CASE-1", json=record(endDate="2026-02-01"), headers=LA1)
    assert r.status == 200 and (await r.json())["version"] == 2
    r = await client.get("/v1/records/CASE-1", headers=LA1)
    assert (await r.json())["endDate"] == "2026-02-01"


async def test_invalid_records_store_nothing(client):
    r = await client.put("/v1/records/CASE-1", json=record(nhsNumber="9990000019"), headers=LA1)
    assert r.status == 422
    assert r.content_type == "application/problem+json"
    p = await r.json()
    assert p["code"] == "CPR04" and p["status"] == 422 and p["errors"][0]["field"] == "nhsNumber"
    assert "9990000019" not in await r.text()
    r = await client.put("/v1/records/CASE-1", json=record(startDate="2999-01-01"), headers=LA1)
    assert r.status == 422 and (await r.json())["code"] == "CPR07"
    assert (await client.get("/v1/records/CASE-1", headers=LA1)).status == 404


async def test_invalid_update_never_overwrites_good_record(client):
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    r = await client.put("/v1/records/CASE-1", json=record(planType="NOPE"), headers=LA1)
    assert r.status == 422
    got = await (await client.get("/v1/records/CASE-1", headers=LA1)).json()
    assert got["planType"] == "CPP" and got["version"] == 1


async def test_list_by_number_and_other_la_sees_nothing(client):
    await client.put("/v1/records/A", json=record("A"), headers=LA1)
    await client.put("/v1/records/B", json=record("B", planType="LAC"), headers=LA1)
    await client.put("/v1/records/Z", json=record("Z"), headers=LA2)
    r = await client.get("/v1/records", params={"nhsNumber": "999 000 0018"}, headers=LA1)
    assert sorted(x["localId"] for x in (await r.json())["records"]) == ["A", "B"]
    r = await client.get("/v1/records", params={"nhsNumber": "9990000026"}, headers=LA1)
    assert (await r.json()) == {"records": []}
    # Another LA's record looks absent: 404, never 403.
    assert (await client.get("/v1/records/Z", headers=LA1)).status == 404
    assert (await client.delete("/v1/records/Z", headers=LA1)).status == 404
    assert (await client.get("/v1/records/Z", headers=LA2)).status == 200
    assert (await client.get("/v1/records", params={"nhsNumber": "12"}, headers=LA1)).status == 422
    assert (await client.get("/v1/records", params={"nhs": "9990000018"}, headers=LA1)).status == 400


async def test_moving_a_record_to_another_number(client):
    await client.put("/v1/records/A", json=record("A"), headers=LA1)
    r = await client.put("/v1/records/A", json=record("A", nhsNumber="9990000026"), headers=LA1)
    assert r.status == 200 and (await r.json())["version"] == 2
    old = await (await client.get("/v1/records", params={"nhsNumber": "9990000018"}, headers=LA1)).json()
    new = await (await client.get("/v1/records", params={"nhsNumber": "9990000026"}, headers=LA1)).json()
    assert old == {"records": []} and [x["localId"] for x in new["records"]] == ["A"]


async def test_erase(client):
    await client.put("/v1/records/A", json=record("A"), headers=LA1)
    assert (await client.delete("/v1/records/A", headers=LA1)).status == 204
    assert (await client.get("/v1/records/A", headers=LA1)).status == 404
    assert (await client.delete("/v1/records/A", headers=LA1)).status == 404


async def test_auth_errors(client):
    assert (await client.get("/v1/records/A")).status == 401
    r = await client.get("/v1/records/A", headers={"Authorization": "Bearer nonsense"})
    assert r.status == 401 and r.content_type == "application/problem+json"
    assert (await client.get("/v1/records/A", headers=ED)).status == 403
    assert (await client.put("/v1/records/A", json=record("A"), headers=OPS)).status == 403
    from tests.support.world import auth

    assert (await client.get("/v1/records/A", headers=auth("local-authority", "LA999"))).status == 403


async def test_body_errors(client):
    r = await client.put("/v1/records/A", data=b"{not json", headers={**LA1, "Content-Type": "application/json"})
    assert r.status == 400 and r.content_type == "application/problem+json"
    r = await client.put("/v1/records/A", data=b"a,b", headers={**LA1, "Content-Type": "text/csv"})
    assert r.status == 415
    big = orjson.dumps(record("A", givenName="x" * (1024 * 1024 + 10)))
    r = await client.put("/v1/records/A", data=big, headers={**LA1, "Content-Type": "application/json"})
    assert r.status == 413


async def test_every_read_and_write_is_audited(client):
    await client.put("/v1/records/A", json=record("A"), headers=LA1)
    await client.get("/v1/records/A", headers=LA1)
    await client.get("/v1/records", params={"nhsNumber": "9990000018"}, headers=LA1)
    await client.delete("/v1/records/A", headers=LA1)
    r = await client.get("/v1/admin/audit", params={"nhsNumber": "9990000018"}, headers=OPS)
    entries = (await r.json())["entries"]
    assert [e["action"] for e in entries] == ["record.erase", "record.list", "record.read", "record.put"]
    assert all(e["org"] == "LA001" and e["role"] == "local-authority" for e in entries)
    assert (await client.get("/v1/admin/audit", params={"nhsNumber": "9990000018"}, headers=LA1)).status == 403
