"""The Helm chart: renders (default and production-like values), lints clean, and every manifest validates against
the Kubernetes schemas (kubernetes-validate) or the prometheus-operator CRD schemas kept in tests/data/crds."""

from __future__ import annotations

import copy
import json

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cpis_bridge.registry import load_registry
from cpis_bridge.store.connection import sentinel_target
from tests.deploy.chart import CHART, CRDS, KUBE_VERSIONS, MINIMAL, PRODUCTION, by_kind, dashboard, render

CRD_SCHEMAS = {
    "ServiceMonitor": CRDS / "monitoring.coreos.com_v1_servicemonitor.json",
    "PrometheusRule": CRDS / "monitoring.coreos.com_v1_prometheusrule.json",
}
EXPECTED_KINDS = {
    "Deployment",
    "Service",
    "ConfigMap",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceMonitor",
    "PrometheusRule",
    "CronJob",
}
HA_VALUES = CHART.parent / "examples" / "ha-values.yaml"
COMMUNITY_VALUES = CHART.parent / "examples" / "valkey-sentinel.values.yaml"
CASES = {"minimal": MINIMAL, "production": PRODUCTION, "ha": yaml.safe_load(HA_VALUES.read_text())}


@pytest.fixture(scope="module")
def rendered():
    return {name: render(values) for name, values in CASES.items()}


def test_default_values_demand_an_external_redis_and_a_shared_hash_key():
    with pytest.raises(helm.HelmError, match=r"redis\.url or redis\.existingSecret is required"):
        render({})
    with pytest.raises(helm.HelmError, match=r"secrets\.existingSecret is required"):
        render({"redis": MINIMAL["redis"]})


def test_production_auth_demands_an_audience():
    """The service refuses to start with a JWKS URL and no audience (any token for any service would pass)."""
    auth = {
        "jwksUrl": "https://login.example.invalid/.well-known/jwks.json",
        "issuer": "https://login.example.invalid/",
    }
    with pytest.raises(helm.HelmError, match=r"auth\.audience is required"):
        render({**MINIMAL, "auth": auth})


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case):
    report = helm.lint(str(CHART), CASES[case], strict=True, namespace="cpis", kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_validates(rendered, case):
    manifests = rendered[case]
    assert {m["kind"] for m in manifests} == EXPECTED_KINDS
    for manifest in manifests:
        kind = manifest["kind"]
        if kind in CRD_SCHEMAS:
            schema = json.loads(CRD_SCHEMAS[kind].read_text())
            jsonschema.validate(manifest, schema, cls=jsonschema.Draft7Validator)
        else:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)


def test_crd_schemas_catch_mistakes(rendered):
    """The hand-kept CRD schemas are not vacuous: broken copies of the rendered objects fail."""
    rule = copy.deepcopy(by_kind(rendered["minimal"], "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, json.loads(CRD_SCHEMAS["PrometheusRule"].read_text()))
    monitor = copy.deepcopy(by_kind(rendered["minimal"], "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, json.loads(CRD_SCHEMAS["ServiceMonitor"].read_text()))


@pytest.mark.parametrize("case", CASES)
def test_deployment_is_hardened_and_drains_gracefully(rendered, case):
    values = CASES[case]
    [deploy] = by_kind(rendered[case], "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e for e in c["env"]}
    assert env["CPIS_HOST"]["value"] == "0.0.0.0"
    assert env["CPIS_DATA_DIR"]["value"].startswith("/tmp/")
    drain = float(env["CPIS_DRAIN_DELAY_S"]["value"])
    grace = float(env["CPIS_SHUTDOWN_GRACE_S"]["value"])
    pre_stop = 0
    if "lifecycle" in c:
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop == values.get("preStopSleepSeconds", 0)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + grace
    # Rolling updates never drop below the desired count; the PDB keeps replicas through node drains.
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_production_secrets_are_references_never_values(rendered):
    [deploy] = by_kind(rendered["production"], "Deployment")
    [c] = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    for name, secret in (("CPIS_REDIS_URL", "cpis-redis"), ("CPIS_LOG_HASH_KEY", "cpis-secrets")):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret and "value" not in env[name]
    assert "CPIS_AUTH_DEV_SECRET" not in env
    assert env["CPIS_AUTH_JWKS_URL"]["value"].startswith("https://")
    assert c["envFrom"] == [{"secretRef": {"name": "cpis-webhooks"}}]
    key_file = env["CPIS_FHIR_AUTH_PRIVATE_KEY_FILE"]["value"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert key_file.startswith(mounts["fhir-key"]["mountPath"] + "/")
    assert not by_kind(rendered["production"], "Secret")  # the chart never creates or embeds secrets
    for m in rendered["production"]:
        text = json.dumps(m).lower()
        assert "password" not in text and "begin private key" not in text


@pytest.mark.parametrize("case", CASES)
def test_selectors_pick_the_service_pods_only(rendered, case):
    manifests = rendered[case]
    [deploy] = by_kind(manifests, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    [svc] = by_kind(manifests, "Service")
    [pdb] = by_kind(manifests, "PodDisruptionBudget")
    [netpol] = by_kind(manifests, "NetworkPolicy")
    [hpa] = by_kind(manifests, "HorizontalPodAutoscaler")
    [monitor] = by_kind(manifests, "ServiceMonitor")
    [cron] = by_kind(manifests, "CronJob")

    def matches(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    assert matches(svc["spec"]["selector"], pod_labels)
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(netpol["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert matches(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    purge_pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    assert not matches(svc["spec"]["selector"], purge_pod["metadata"]["labels"])
    assert purge_pod["spec"]["containers"][0]["args"][0] == "purge"
    assert "replicas" not in deploy["spec"]  # the HPA owns the replica count


@pytest.mark.parametrize("case", CASES)
def test_registry_configmap_loads_with_the_service_loader(rendered, case, tmp_path):
    [cm] = [m for m in by_kind(rendered[case], "ConfigMap") if "registry.yaml" in m["data"]]
    path = tmp_path / "registry.yaml"
    path.write_text(cm["data"]["registry.yaml"])
    registry = load_registry(path)
    assert "LA001" in registry.local_authorities and "RXX01" in registry.care_settings
    [deploy] = by_kind(rendered[case], "Deployment")
    [c] = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "registry")
    assert env["CPIS_REGISTRY"] == mount["mountPath"] and mount["subPath"] == "registry.yaml"


def test_dashboard_ships_in_a_configmap(rendered):
    manifests = rendered["minimal"]
    board = dashboard(manifests)
    assert board == json.loads((CHART / "dashboards" / "cpis-bridge.json").read_text())
    assert board["uid"] == "cpis-bridge" and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}" and "datasource" in variables
        assert all(t["expr"] and t["refId"] for t in panel["targets"])
        assert all('job=~"$job"' in t["expr"] for t in panel["targets"]), panel["title"]


@pytest.mark.parametrize(
    "bad",
    [
        {"securityContext": {"readOnlyRootFilesystem": False, "allowPrivilegeEscalation": False}},
        {"podSecurityContext": {"runAsNonRoot": False}},
        {"fhir": {"authMode": "basic"}},
        {"drainDelaySeconds": -1},
        {"redis": {"url": "http://redis:6379"}},
        {"unknownSetting": True},
    ],
)
def test_values_schema_rejects_unsafe_or_unknown_values(bad):
    values = copy.deepcopy(MINIMAL)
    for key, value in bad.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_the_ha_example_finds_the_primary_through_the_community_charts_sentinels(rendered):
    """The example HA values (helm/examples) against the community Valkey chart's values beside them: the service
    and the purge job reach the Sentinels the community chart runs, for its primary set, with its password Secret,
    and wait for one replica; the store is fenced and persists with AOF fsync always."""
    community = yaml.safe_load(COMMUNITY_VALUES.read_text())
    for kind in ("Deployment", "CronJob"):
        [manifest] = by_kind(rendered["ha"], kind)
        spec = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"] if kind == "CronJob" else None
        spec = spec or manifest["spec"]["template"]["spec"]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        nodes, master, _, _ = sentinel_target(env["CPIS_REDIS_URL"]["value"])
        assert master == community["sentinel"]["primarySet"]
        assert len(nodes) == community["replica"]["replicaCount"] and {p for _, p in nodes} == {26379}
        ref = env["CPIS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (
            community["auth"]["existingSecret"],
            community["auth"]["existingSecretPasswordKey"],
        )
        assert env["CPIS_REDIS_MIN_REPLICAS"]["value"] == "1"
    config = community["commonConfiguration"]
    for line in ("appendonly yes", "appendfsync always", "min-replicas-to-write 1", "min-replicas-max-lag 5"):
        assert line in config.splitlines()
