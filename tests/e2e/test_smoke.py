from tests.conftest import LA1, LA2, record


async def test_put_get(client):
    r = await client.put("/v1/records/CASE-1", json=record(), headers=LA1)
    assert r.status == 201, await r.text()
    body = await r.json()
    assert body["version"] == 1 and body["visible"] is True
    r = await client.get("/v1/records/CASE-1", headers=LA1)
    assert r.status == 200
    r = await client.get("/v1/records/CASE-1", headers=LA2)
    assert r.status == 404
