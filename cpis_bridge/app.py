"""create_app(settings): the aiohttp application, its routes, and the one context that opens the services
(compose.open_services), starts their background work and publishes them to the handlers as a frozen Services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from redis.asyncio import Redis

from cpis_bridge.compose import open_services, running
from cpis_bridge.config import Settings
from cpis_bridge.core.access import SEP
from cpis_bridge.metrics import Metrics
from cpis_bridge.registry import load_registry
from cpis_bridge.services.health import watch_store
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.scripts import Scripts
from cpis_bridge.web import admin, cds, fhir, la, notifications, openapi, ops, views
from cpis_bridge.web.middlewares import DEFAULT_LIMIT, make_middlewares
from cpis_bridge.web.server import HANDLER_ARGS
from cpis_bridge.web.state import LIFECYCLE, METRICS, REGISTRY, SERVICES, SETTINGS, Lifecycle

log = logging.getLogger("cpis_bridge.app")

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]
# The store's client, for tests and tools that read it directly (handlers never do: they have SERVICES).
REDIS = web.AppKey("redis", Redis)
KEYS = web.AppKey("keys", Keys)
SCRIPTS = web.AppKey("scripts", Scripts)
MONITOR_INTERVAL_S = 5.0


class ConfigurationError(RuntimeError):
    pass


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    """Opens the store and everything on it, publishes the handlers' Services, runs the background work (relays,
    Flag sync, upload resumer); on the way out stops the work, then closes the store."""
    settings, registry = app[SETTINGS], app[REGISTRY]
    async with open_services(settings, registry=registry, metrics=app[METRICS]) as opened:
        app[SERVICES] = opened.services
        app[REDIS], app[KEYS], app[SCRIPTS] = opened.redis, opened.keys, opened.scripts
        if registry.care_settings:
            await opened.redis.hset(
                opened.keys.care_settings,
                mapping={c.ods: f"{c.name}{SEP}{c.type}" for c in registry.care_settings.values()},
            )
        app[LIFECYCLE].redis_ok = True
        async with running(opened):
            yield


def make_monitor(interval_s: float = MONITOR_INTERVAL_S) -> CleanupCtx:
    """A periodic task keeping cpis_redis_up and cpis_ready current between scrapes and /readyz probes."""

    async def monitor_ctx(app: web.Application) -> AsyncIterator[None]:
        metrics, life = app[METRICS], app[LIFECYCLE]

        def probed(ok: bool) -> None:
            life.redis_ok = ok
            metrics.redis_up.set(1 if ok else 0)
            metrics.ready.set(1 if ok and life.started and not life.draining else 0)

        stop = asyncio.Event()
        task = asyncio.create_task(
            watch_store(app[SERVICES].store, probed, stop, interval_s=interval_s), name="redis-monitor"
        )
        yield
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.ready.set(0)

    return monitor_ctx


async def ready_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last in the chain: the app is ready once everything before it started; draining starts first on the way out."""
    app[LIFECYCLE].started = True
    log.info("app.ready")
    yield
    app[LIFECYCLE].draining = True


async def publish_ready(app: web.Application) -> None:
    """Runs after every cleanup context started: the gauges show the service ready from the first scrape."""
    life = app[LIFECYCLE]
    app[METRICS].ready.set(1 if life.started and life.redis_ok and not life.draining else 0)
    app[METRICS].redis_up.set(1 if life.redis_ok else 0)


def create_app(settings: Settings | None = None, *, extra_contexts: list[CleanupCtx] | None = None) -> web.Application:
    settings = settings or Settings()
    if not settings.dev_mode and not settings.redis_url and not settings.allow_embedded_redis:
        raise ConfigurationError(
            "production auth is configured but CPIS_REDIS_URL is not: set it, or CPIS_ALLOW_EMBEDDED_REDIS=true"
        )
    app = web.Application(middlewares=make_middlewares(), client_max_size=DEFAULT_LIMIT, handler_args=HANDLER_ARGS)
    app[SETTINGS] = settings
    app[REGISTRY] = load_registry(settings.registry)
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    for ctx in (services_ctx, cds.http_ctx, make_monitor(), *(extra_contexts or []), ready_ctx):
        app.cleanup_ctx.append(ctx)
    app.on_startup.append(publish_ready)
    # Routes: each web module adds its own (a new surface adds one line here).
    la.setup(app)
    openapi.setup(app)
    fhir.setup(app)
    cds.setup(app)
    app.router.add_routes(ops.routes)
    app.router.add_routes(notifications.routes)
    app.router.add_routes(admin.routes)
    views.setup(app)
    return app
