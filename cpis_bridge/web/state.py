"""Typed application state (aiohttp AppKeys): the configuration create_app sets, and the frozen Services the
composition root (compose.py) builds once the store is open: everything a handler calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from cpis_bridge.auth import Authenticator
from cpis_bridge.config import Settings
from cpis_bridge.core.ports import AuditLog, LaunchStore, SignInThrottle, StoreHealth, WebSessions
from cpis_bridge.core.registry import Registry
from cpis_bridge.metrics import Metrics
from cpis_bridge.services.access import AccessService
from cpis_bridge.services.delivery import DeliveryAdmin
from cpis_bridge.services.inbox import InboxService
from cpis_bridge.services.records import RecordService
from cpis_bridge.services.uploads import UploadService


@dataclass
class Lifecycle:
    """Start-up and shutdown state read by /readyz."""

    started: bool = False
    draining: bool = False
    redis_ok: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers use, built on the store's adapters by compose.open_services (a new web view's needs are
    added here and there)."""

    auth: Authenticator
    records: RecordService
    access: AccessService
    audit: AuditLog
    inbox: InboxService
    deliveries: DeliveryAdmin
    uploads: UploadService
    store: StoreHealth
    sessions: WebSessions  # the web views' sessions
    signin: SignInThrottle  # the duty-team view's failed sign-ins per client address
    la_signin: SignInThrottle  # the duty-team view's failed sign-ins per LA, from every address
    ed_signin: SignInThrottle  # the clinician view's sign-in and launch failures (counted apart)
    launches: LaunchStore  # the clinician view's launch contexts (minted by CDS cards)


SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
SERVICES = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    """The app's Services (from a view's sub-application too)."""
    return request.config_dict[SERVICES]
