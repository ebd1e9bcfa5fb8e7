"""Prometheus metrics on one injected CollectorRegistry (never the global one). No NHS number or name in labels."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHANNELS = ("webhook", "fhir", "inbox", "flag-sync")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "cpis_http_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "cpis_http_request_duration_seconds",
            "HTTP request latency by route template, method and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.accesses = Counter(
            "cpis_accesses_total",
            "Look-ups and attendances by kind and whether the child was flagged",
            ["kind", "flagged"],
            registry=r,
        )
        self.upload_records = Counter(
            "cpis_upload_records_total", "Uploaded records by result code", ["code"], registry=r
        )
        self.uploads = Counter("cpis_uploads_total", "Upload files by file code", ["code"], registry=r)
        self.upload_mass_end_refused = Counter(
            "cpis_upload_mass_end_refused_total", "Full uploads refused for ending too much of a caseload", registry=r
        )
        self.uploads_resumed = Counter(
            "cpis_uploads_resumed_total", "Interrupted uploads completed from their journal", registry=r
        )
        self.deliveries = Counter(
            "cpis_deliveries_total",
            "Delivery attempts by channel and outcome (delivered/retried/dead)",
            ["channel", "outcome"],
            registry=r,
        )
        self.delivery_pending = Gauge(
            "cpis_delivery_pending", "Entries waiting for delivery, by channel", ["channel"], registry=r
        )
        self.delivery_oldest = Gauge(
            "cpis_delivery_oldest_pending_seconds",
            "Age of the oldest undelivered entry, by channel",
            ["channel"],
            registry=r,
        )
        self.delivery_dead = Gauge("cpis_delivery_dead", "Dead letters held, by channel", ["channel"], registry=r)
        self.delivery_latency = Histogram(
            "cpis_delivery_latency_seconds",
            "Time from queueing to successful delivery, by channel",
            ["channel"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_breaker_open = Gauge(
            "cpis_delivery_breaker_open",
            "1 while this process's circuit breaker for an LA endpoint is open or half-open (its entries are held "
            "aside), else 0; by channel and LA ODS code",
            ["channel", "la"],
            registry=r,
        )
        self.delivery_breaker_transitions = Counter(
            "cpis_delivery_breaker_transitions_total",
            "Circuit breaker transitions of an LA endpoint in this process, by channel, LA ODS code and new state "
            "(open, half-open, closed)",
            ["channel", "la", "state"],
            registry=r,
        )
        self.redis_up = Gauge("cpis_redis_up", "1 when Redis answers, else 0", registry=r)
        self.ready = Gauge("cpis_ready", "1 when the service is ready to serve, else 0", registry=r)
        self.unreadable = Counter(
            "cpis_unreadable_items_total",
            "Stored items a reader skipped because they cannot be rendered, by kind",
            ["item"],
            registry=r,
        )
        self.web_signins = Counter(
            "cpis_web_signins_total",
            "Web view sign-in attempts by method (oidc, dev; the clinician view: smart, ed-dev), outcome "
            "(signed-in, failed, refused) and reason",
            ["method", "outcome", "reason"],
            registry=r,
        )
        self.audit_entries = Counter("cpis_audit_entries_total", "Audit entries written", ["action"], registry=r)
        self.build = Info("cpis_build", "The running build: package version and Python version", registry=r)
        self.build.info({"version": _version(), "python": platform.python_version()})
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        PlatformCollector(registry=r)
        for kind in ("unscheduled", "silent"):
            for flagged in ("true", "false"):
                self.accesses.labels(kind, flagged)
        for channel in CHANNELS:
            self.delivery_latency.labels(channel)
            self.delivery_pending.labels(channel)
            self.delivery_oldest.labels(channel)
            self.delivery_dead.labels(channel)
            for outcome in ("delivered", "retried", "dead"):
                self.deliveries.labels(channel, outcome)

        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._access_children = {
            (kind == "unscheduled", flagged == "true"): self.accesses.labels(kind, flagged)
            for kind in ("unscheduled", "silent")
            for flagged in ("true", "false")
        }

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency; the labelled children are bound once per label set (a
        ``.labels()`` lookup per request costs microseconds on the hot path)."""
        key = (route, method, status)
        children = self._http_children.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = (self.http_requests.labels(*labels), self.http_duration.labels(*labels))
            self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_access(self, *, unscheduled: bool, flagged: bool) -> None:
        self._access_children[(unscheduled, flagged)].inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _version() -> str:
    try:
        return metadata.version("cpis-bridge")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"
