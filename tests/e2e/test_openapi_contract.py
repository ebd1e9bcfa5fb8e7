"""The app's real answers conform to the published document: every status is documented for its operation, and
every body validates against the documented schema for that status and content type (happy paths and errors)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from aiohttp import ClientResponse

from cpis_bridge.web.openapi import document
from tests.support.world import ED, LA1, OPS, record

DOC = document()
NHS = "9990000018"


def _schema_for(method: str, template: str, status: int, content_type: str) -> dict[str, Any] | None:
    op = DOC["paths"][template][method.lower()]
    responses = op["responses"]
    assert str(status) in responses, f"{method} {template} answered {status}, which the document does not list"
    response = responses[str(status)]
    if "$ref" in response:
        response = DOC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    content = response.get("content")
    if content is None:
        return None
    assert content_type in content, f"{method} {template} {status}: {content_type} not documented"
    schema: dict[str, Any] = content[content_type]["schema"]
    return schema


async def conforms(r: ClientResponse, template: str) -> Any:
    """Assert the response is documented and its body matches; returns the parsed body."""
    schema = _schema_for(r.method, template, r.status, r.content_type)
    if schema is None:
        assert await r.read() == b""
        return None
    body = await r.json(content_type=None)
    validator = jsonschema_rs.validator_for({**schema, "components": DOC["components"]})
    errors = [str(e) for e in validator.iter_errors(body)]
    assert errors == [], f"{r.method} {template} {r.status}: {errors[:3]}"
    return body


async def test_records_conform(client: Any) -> None:
    t = "/v1/records/{localId}"
    r = await client.put("/v1/records/C-1", json=record("C-1", planType="LAC", lacLegalBasis="C2"), headers=LA1)
    body = await conforms(r, t)
    assert r.status == 201 and body["version"] == 1
    assert r.headers["ETag"] == 'W/"1"' and r.headers["Location"] == "/v1/records/C-1"
    r = await client.put("/v1/records/C-1", json={**body, "endDate": "2026-02-01"}, headers=LA1)
    assert r.status == 200 and (await conforms(r, t))["version"] == 2
    r = await client.get("/v1/records/C-1", headers=LA1)
    assert r.status == 200 and (await conforms(r, t))["endDate"] == "2026-02-01"
    r = await client.get(f"/v1/records?nhsNumber={NHS}", headers=LA1)
    assert r.status == 200 and len((await conforms(r, "/v1/records"))["records"]) == 1

    problems = [
        (await client.put("/v1/records/C-2", json=record("C-2", nhs="9990000011"), headers=LA1), "CPR04"),
        (await client.put("/v1/records/C-2", json=record("C-2", planType="XYZ"), headers=LA1), "CPR07"),
    ]
    for r, code in problems:
        assert r.status == 422 and (await conforms(r, t))["code"] == code
    r = await client.put("/v1/records/C-2", data=b"{nope", headers={**LA1, "Content-Type": "application/json"})
    assert r.status == 400
    await conforms(r, t)
    r = await client.put("/v1/records/C-2", data=b"a,b", headers={**LA1, "Content-Type": "text/csv"})
    assert r.status == 415
    await conforms(r, t)
    r = await client.put(
        "/v1/records/C-2", data=b" " * (1024 * 1024 + 1), headers={**LA1, "Content-Type": "application/json"}
    )
    assert r.status == 413
    await conforms(r, t)
    r = await client.get("/v1/records?nhsNumber=123", headers=LA1)
    assert r.status == 422
    await conforms(r, "/v1/records")
    r = await client.get("/v1/records?nhs=1", headers=LA1)
    assert r.status == 400
    await conforms(r, "/v1/records")

    r = await client.delete("/v1/records/C-1", headers=LA1)
    assert r.status == 204
    await conforms(r, t)
    for method in ("GET", "DELETE"):
        r = await client.request(method, "/v1/records/C-1", headers=LA1)
        assert r.status == 404
        await conforms(r, t)


@pytest.mark.parametrize("kind", ["json", "ndjson", "csv"])
async def test_uploads_conform(client: Any, kind: str) -> None:
    t = "/v1/uploads"
    good, bad_nhs, bad_plan = record("U-1"), record("U-2", nhs="9990000011"), record("U-3", planType="XYZ")
    rows = [good, bad_nhs, bad_plan]
    if kind == "json":
        req = {"json": {"sequence": 3, "mode": "delta", "recordCount": 3, "records": rows}}
    elif kind == "ndjson":
        req = {
            "data": "".join(json.dumps(x) + "\n" for x in rows).encode(),
            "headers": {
                "Content-Type": "application/x-ndjson",
                "Upload-Sequence": "3",
                "Upload-Mode": "delta",
                "Upload-Record-Count": "3",
            },
        }
    else:
        cols = ["localId", "planType", "nhsNumber", "dateOfBirth", "startDate"]
        text = ",".join(cols) + "\n" + "".join(",".join(str(x[c]) for c in cols) + "\n" for x in rows)
        req = {
            "data": text.encode(),
            "headers": {"Content-Type": "text/csv", "Upload-Sequence": "3", "Upload-Mode": "delta"},
        }
    headers = {**LA1, **req.pop("headers", {})}
    r = await client.post(t, headers=headers, **req)
    report = await conforms(r, t)
    assert r.status == 200 and report["fileCode"] == "CPF03"
    assert [(x["index"], x["localId"], x["code"]) for x in report["rejections"]] == [
        (1, "U-2", "CPR04"),
        (2, "U-3", "CPR07"),
    ]
    r = await client.post(t, headers=headers, **req)
    assert r.status == 200 and r.headers["Upload-Replayed"] == "true"
    assert await conforms(r, t) == report

    r = await client.post(t, json={"sequence": 2, "mode": "delta", "records": []}, headers=LA1)
    assert r.status == 409
    await conforms(r, t)
    r = await client.post(
        t, data=b'{"sequence": 9, "mode": "delta", "records": [', headers={**LA1, "Content-Type": "application/json"}
    )
    assert r.status == 422 and (await conforms(r, t))["code"] == "CPF01"
    r = await client.post(t, json={"sequence": 9, "mode": "delta", "recordCount": 5, "records": [good]}, headers=LA1)
    assert r.status == 422 and (await conforms(r, t))["code"] == "CPF01"
    r = await client.post(t, data=b"x", headers={**LA1, "Content-Type": "application/xml"})
    assert r.status == 415
    await conforms(r, t)


async def test_auth_and_admin_conform(client: Any) -> None:
    r = await client.put("/v1/records/C-9", json=record("C-9"), headers=LA1)
    assert r.status == 201
    for headers, status in (({}, 401), (ED, 403), (OPS, 403)):
        r = await client.get("/v1/records/C-9", headers=headers)
        assert r.status == status
        await conforms(r, "/v1/records/{localId}")
    r = await client.get(f"/v1/admin/audit?nhsNumber={NHS}", headers=OPS)
    body = await conforms(r, "/v1/admin/audit")
    assert r.status == 200 and {e["action"] for e in body["entries"]} >= {"record.put"}
    r = await client.get(f"/v1/admin/audit?nhsNumber={NHS}", headers=LA1)
    assert r.status == 403
    await conforms(r, "/v1/admin/audit")
    r = await client.get("/v1/admin/audit?nhsNumber=12", headers=OPS)
    assert r.status == 422
    await conforms(r, "/v1/admin/audit")
    r = await client.get("/v1/openapi.json")
    assert r.status == 200
    await conforms(r, "/v1/openapi.json")
