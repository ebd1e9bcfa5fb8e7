"""The published OpenAPI 3.1 document: valid, served publicly, and in step with the app's router both ways."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jsonschema_rs
from aiohttp import web

from cpis_bridge.app import create_app
from cpis_bridge.core.codes import FileCode, RecordCode
from cpis_bridge.core.records import READ_ONLY_FIELDS, WRITABLE_FIELDS
from cpis_bridge.web.common import policy_of
from cpis_bridge.web.openapi import document

# Documented /v1 routes that other branches build (docs/contract.md §4 and 8). They are not routed on this branch yet.
# LEAD: delete each entry once its branch is merged; the test fails until you do (a routed route must not be
# listed here), so the list cannot go stale silently.
PENDING_ROUTES: frozenset[tuple[str, str]] = frozenset()  # documented routes not routed yet: none
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
ERROR_STATUSES = {"400", "401", "403", "404", "409", "413", "415", "422", "503"}


def v1_routes(app: web.Application) -> dict[tuple[str, str], Any]:
    """(METHOD, path template) -> handler for every /v1 route; HEAD routes that aiohttp adds beside a GET are left
    out (HEAD mirrors GET). A wildcard-method route would hide its methods, so it is refused outright."""
    by_path: dict[str, dict[str, Any]] = defaultdict(dict)
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        assert route.method != "*", f"wildcard-method route {resource.canonical}: list its methods"
        by_path[resource.canonical][route.method] = route.handler
    out: dict[tuple[str, str], Any] = {}
    for path, methods in by_path.items():
        if not path.startswith("/v1/"):
            continue
        for method, handler in methods.items():
            if method == "HEAD" and "GET" in methods:
                continue
            out[(method, path)] = handler
    return out


def documented(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    }


def test_document_is_valid_openapi_31() -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    doc = document("http://127.0.0.1:8080")
    assert doc["openapi"].startswith("3.1.")
    errors = [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(doc)]
    assert errors == []
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_router_and_document_agree(settings: Any) -> None:
    app = create_app(settings)
    routed = v1_routes(app)
    docs = documented(document())
    missing_from_doc = sorted(set(routed) - set(docs))
    assert missing_from_doc == [], "routes the OpenAPI document does not describe"
    not_routed = set(docs) - set(routed)
    assert sorted(not_routed - PENDING_ROUTES) == [], "documented routes the router lacks"
    assert sorted(PENDING_ROUTES - not_routed) == [], "now routed: delete these from PENDING_ROUTES"


def test_security_matches_route_policies(settings: Any) -> None:
    """Public routes say `security: []`; every other operation needs the bearer token and documents 401 and 403."""
    app = create_app(settings)
    doc = document()
    assert doc["security"] == [{"bearerAuth": []}]
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    docs = documented(doc)
    for key, handler in v1_routes(app).items():
        policy = policy_of(handler)
        assert policy is not None, key
        op = docs[key]
        if policy.public:
            assert op.get("security") == [], key
        else:
            assert "security" not in op, key
    for key, op in docs.items():
        if op.get("security") == []:
            continue
        assert {"401", "403"} <= set(op["responses"]), key


def test_error_responses_are_problem_json() -> None:
    doc = document()
    responses = doc["components"]["responses"]
    for key, op in documented(doc).items():
        for status, response in op["responses"].items():
            if status in ERROR_STATUSES:
                ref = response["$ref"]
                body = responses[ref.rsplit("/", 1)[1]]["content"]
                assert list(body) == ["application/problem+json"], (key, status)
                assert body["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
        if "requestBody" in op:
            assert {"413", "415", "422"} <= set(op["responses"]), key
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert {"code", "errors"} <= set(problem["properties"])


def test_schemas_match_the_domain() -> None:
    """Codes and record fields come from core, so the document cannot drift from them unnoticed."""
    schemas = document()["components"]["schemas"]
    assert schemas["FileCode"]["enum"] == [c.value for c in FileCode]
    assert schemas["RecordCode"]["enum"] == [c.value for c in RecordCode]
    assert set(schemas["RecordInput"]["properties"]) == WRITABLE_FIELDS | READ_ONLY_FIELDS
    assert set(schemas["Record"]["properties"]) == WRITABLE_FIELDS | READ_ONLY_FIELDS
    upload = documented(document())[("POST", "/v1/uploads")]
    assert set(upload["requestBody"]["content"]) == {"application/json", "application/x-ndjson", "text/csv"}
    headers = {p["name"] for p in upload["parameters"] if p["in"] == "header"}
    assert headers == {"Upload-Sequence", "Upload-Mode", "Upload-Record-Count", "Upload-Confirm-End"}
    report = schemas["UploadReport"]
    assert set(report["required"]) >= {
        "sequence",
        "fileCode",
        "received",
        "accepted",
        "rejected",
        "ended",
        "rejections",
    }
    assert set(report["properties"]["rejections"]["items"]["required"]) == {"index", "localId", "code", "detail"}


async def test_served_without_a_token(client: Any) -> None:
    r = await client.get("/v1/openapi.json")
    assert r.status == 200
    assert r.content_type == "application/json"
    body = await r.json()
    assert body["openapi"] == "3.1.0"
    assert body["servers"][0]["url"] == "http://127.0.0.1:8080"
    assert set(body["paths"]) == set(document()["paths"])
    r = await client.post("/v1/openapi.json")
    assert r.status == 405
