"""Typed application state (aiohttp AppKeys): the objects create_app wires and the handlers use."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from redis.asyncio import Redis

from cpis_bridge.auth import Authenticator
from cpis_bridge.config import Settings
from cpis_bridge.core.registry import Registry
from cpis_bridge.metrics import Metrics
from cpis_bridge.services.access import AccessService
from cpis_bridge.services.records import RecordService
from cpis_bridge.store.audit import RedisAuditLog
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.scripts import Scripts


@dataclass
class Lifecycle:
    """Start-up and shutdown state read by /readyz."""

    started: bool = False
    draining: bool = False
    redis_ok: bool = False
    notes: list[str] = field(default_factory=list)


SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", Authenticator)
REDIS = web.AppKey("redis", Redis)
KEYS = web.AppKey("keys", Keys)
SCRIPTS = web.AppKey("scripts", Scripts)
RECORDS = web.AppKey("records", RecordService)
ACCESS = web.AppKey("access", AccessService)
AUDIT = web.AppKey("audit", RedisAuditLog)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
