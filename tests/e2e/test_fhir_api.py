"""The care-setting FHIR API over HTTP against real Redis: every request of API.md section 3, R4B-valid answers."""

from __future__ import annotations

import orjson

from cpis_bridge.fhir.profiles import validate_r4
from cpis_bridge.web.state import KEYS, REDIS
from tests.conftest import ED, LA1, record

NHS = "https://fhir.nhs.uk/Id/nhs-number"


async def test_smoke_careteam(client):
    r = await client.put("/v1/records/CASE-1", json=record(), headers=LA1)
    assert r.status == 201
    r = await client.get(f"/fhir/CareTeam?patient:identifier={NHS}|9990000018", headers=ED)
    assert r.status == 200, await r.text()
    body = await r.json(content_type=None)
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    validate_r4(body)
    assert body["total"] == 1
    assert await client.app[REDIS].llen(client.app[KEYS].accesses(client.app[KEYS].tag("9990000018"))) == 1
