"""Every metric the shipped Grafana dashboard and PrometheusRule use is exposed by the real service on /metrics
after a little traffic (PromQL parsed with promql-parser), and no label carries an NHS number or a name."""

from __future__ import annotations

import re

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.chart import PRODUCTION, by_kind, dashboard, render
from tests.support.world import LA1, OPS, record

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "${job}": ".*", "$job": ".*"}
API_FAMILIES = {
    "cpis_http_requests_total",
    "cpis_http_request_duration_seconds_bucket",
    "cpis_accesses_total",
    "cpis_upload_records_total",
    "cpis_deliveries_total",
    "cpis_delivery_pending",
    "cpis_delivery_oldest_pending_seconds",
    "cpis_redis_up",
}
NHS = re.compile(r"(?<![0-9])[0-9]{3}[ -]?[0-9]{3}[ -]?[0-9]{4}(?![0-9])")


def metric_names(expr: str) -> set[str]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def used_by_dashboard_and_rules() -> dict[str, set[str]]:
    manifests = render(PRODUCTION)
    used: dict[str, set[str]] = {}
    [rule] = by_kind(manifests, "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            for name in metric_names(str(r["expr"])):
                used.setdefault(name, set()).add(f"alert {r.get('alert') or r.get('record')}")
    board = dashboard(manifests)
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']}")
    for variable in board["templating"]["list"]:
        for name in re.findall(r"label_values\((\w+)", str(variable.get("query", ""))):
            used.setdefault(name, set()).add(f"variable {variable['name']}")
    return used


def test_metric_names_come_from_the_parsed_expression():
    assert metric_names('sum(rate(a_total{job=~"$job",x="b_total"}[$__rate_interval])) / on(job) b > bool 3') == {
        "a_total",
        "b",
    }
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))") == {"h_bucket"}


def test_dashboard_and_rules_cover_the_alerts_the_issue_asks_for():
    [rule] = by_kind(render(PRODUCTION), "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "CpisNotificationBacklog",
        "CpisDeadLetters",
        "CpisNotReady",
        "CpisHigh5xxRate",
        "CpisFlagSyncLag",
        "CpisRedisDown",
    } <= set(alerts)
    assert "120" in alerts["CpisNotificationBacklog"]  # the production value reached the rule


async def test_every_metric_used_is_exposed_after_traffic(client):
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    assert (await client.get("/v1/records/CASE-1", headers=LA1)).status == 200
    assert (await client.get("/v1/records", params={"nhsNumber": "9990000018"}, headers=LA1)).status == 200
    upload = {"sequence": 1, "mode": "delta", "records": [record("CASE-2", "9990000026"), {"localId": "BAD"}]}
    assert (await client.post("/v1/uploads", json=upload, headers=LA1)).status == 200
    assert (await client.get("/v1/admin/audit", params={"nhsNumber": "9990000018"}, headers=OPS)).status == 200
    assert (await client.get("/no/such/route")).status == 404
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()

    families = list(text_string_to_metric_families(text))
    samples = [s for family in families for s in family.samples]
    exposed = {s.name for s in samples}
    # Families labelled per LA endpoint have samples only where the registry gives an LA a push channel (the test
    # registry gives none): here they must be declared; tests/integration/test_delivery_isolation.py sees them move.
    exposed |= {
        f.name + ("_total" if f.type == "counter" else "")
        for f in families
        if not f.samples and "LA ODS code" in f.documentation
    }
    used = used_by_dashboard_and_rules()
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not missing, f"used by the dashboard or the rules but not exposed: {missing}"
    assert API_FAMILIES <= exposed
    assert len(used) >= 10

    values = {s.name: s.value for s in samples if not s.labels}
    assert values["cpis_redis_up"] == 1 and values["cpis_ready"] == 1
    routes = {s.labels["route"] for s in samples if s.name == "cpis_http_requests_total"}
    assert {"/v1/records/{localId}", "/v1/records", "/v1/uploads", "/v1/admin/audit", "unmatched"} <= routes
    codes = {s.labels["code"] for s in samples if s.name == "cpis_upload_records_total" and s.value > 0}
    assert "CPR00" in codes or len(codes) >= 2
    assert any(s.name == "cpis_build_info" and s.labels.get("version") for s in samples)
    for s in samples:
        for value in s.labels.values():
            assert not NHS.search(value), (s.name, s.labels)
            assert "Testchild" not in value and "Example" not in value
