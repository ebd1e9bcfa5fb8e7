"""Rendering the Helm chart offline with Helm's own library (helm-python-sdk), shared by the deployment tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cpis-bridge"
CRDS = ROOT / "tests" / "data" / "crds"
KUBE_VERSIONS = ("1.28.0", "1.33.0")

PRODUCTION_REGISTRY = """\
localAuthorities:
  - ods: LA001
    name: Example Borough Council Children's Services
    officeHoursPhone: "0300 000 0001"
    emergencyDutyPhone: "0300 000 0002"
    notify:
      webhook: {url: "https://la001.example.invalid/cpis", secretEnv: LA001_WEBHOOK_SECRET}
careSettings:
  - {ods: RXX01, name: Example Hospital Emergency Department, type: ED, unscheduled: true}
"""
MINIMAL: dict[str, Any] = {
    "redis": {"url": "redis://redis-primary:6379/0"},
    "secrets": {"existingSecret": "cpis-secrets"},
}
PRODUCTION: dict[str, Any] = {
    "replicaCount": 3,
    "image": {"repository": "registry.example.invalid/cpis-bridge", "tag": "0.1.0", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "redis": {"existingSecret": "cpis-redis", "secretKey": "url"},
    "auth": {
        "jwksUrl": "https://login.example.invalid/.well-known/jwks.json",
        "issuer": "https://login.example.invalid/",
        "audience": "cpis-bridge",
    },
    "publicBaseUrl": "https://cpis.example.invalid",
    "secrets": {"existingSecret": "cpis-secrets", "webhookSecret": "cpis-webhooks"},
    "fhir": {
        "baseUrl": "https://fhir.example.invalid/R4",
        "authMode": "private-key-jwt",
        "tokenUrl": "https://fhir.example.invalid/token",
        "clientId": "cpis-bridge",
        "kid": "key-1",
        "scope": "system/Flag.write",
        "existingSecret": "cpis-fhir",
    },
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12, "targetCPUUtilizationPercentage": 60},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
    "networkPolicy": {
        "enabled": True,
        "ingressFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        ],
        "egress": {
            "allowDNS": True,
            "httpsPort": 443,
            "extra": [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 6380}]}],
        },
    },
    "preStopSleepSeconds": 3,
    "drainDelaySeconds": 10,
    "shutdownGraceSeconds": 20,
    "resources": {"requests": {"cpu": "500m", "memory": "384Mi"}, "limits": {"cpu": "2", "memory": "768Mi"}},
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "oldestPendingSeconds": 120},
    "grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "1"}},
    "purge": {"enabled": True, "schedule": "30 2 * * *"},
    "registry": PRODUCTION_REGISTRY,
}


def render(values: dict[str, Any], *, name: str = "cpis", namespace: str = "cpis") -> list[dict[str, Any]]:
    """Every manifest the chart renders with these values (Helm's own engine, no cluster, no binary)."""
    chart = helm.Chart.load(str(CHART))
    out: list[dict[str, Any]] = []
    for path, text in sorted(chart.render(values, name=name, namespace=namespace).items()):
        if path.endswith(".txt") or path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def dashboard(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    [cm] = [m for m in by_kind(manifests, "ConfigMap") if "cpis-bridge.json" in m.get("data", {})]
    result: dict[str, Any] = json.loads(cm["data"]["cpis-bridge.json"])
    return result
