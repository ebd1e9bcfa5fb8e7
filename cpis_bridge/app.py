"""create_app(settings): the one place that builds the concrete adapters and wires them into the aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from cpis_bridge.auth import Authenticator
from cpis_bridge.config import Settings
from cpis_bridge.core.access import SEP
from cpis_bridge.metrics import Metrics
from cpis_bridge.registry import load_registry
from cpis_bridge.services.access import AccessService
from cpis_bridge.services.records import RecordService
from cpis_bridge.services.retention import RetentionPolicy, RetentionService
from cpis_bridge.store.accesses import RedisAccessStore
from cpis_bridge.store.audit import RedisAuditLog
from cpis_bridge.store.connection import make_client
from cpis_bridge.store.embedded import EmbeddedRedis, socket_answers
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.records import RedisRecordStore
from cpis_bridge.store.retention import RedisRetentionStore
from cpis_bridge.store.scripts import Scripts
from cpis_bridge.web import la, ops
from cpis_bridge.web.middlewares import DEFAULT_LIMIT, make_middlewares
from cpis_bridge.web.state import (
    ACCESS,
    AUDIT,
    AUTH,
    KEYS,
    LIFECYCLE,
    METRICS,
    RECORDS,
    REDIS,
    REGISTRY,
    SETTINGS,
    Lifecycle,
)

log = logging.getLogger("cpis_bridge.app")

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]
SCRIPTS = web.AppKey("scripts", Scripts)
HTTP = web.AppKey("http", aiohttp.ClientSession)
EMBEDDED = web.AppKey("embedded", EmbeddedRedis)


class ConfigurationError(RuntimeError):
    pass


def redis_url_for(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis to use: CPIS_REDIS_URL, a running embedded server in the data dir, or a new one (started here)."""
    if settings.redis_url:
        return settings.redis_url, None
    embedded = EmbeddedRedis(settings.data_dir)
    if socket_answers(embedded.socket_path):
        return embedded.url, None
    embedded.start()
    return embedded.url, embedded


async def _wait_for_redis(client: object) -> None:
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(15), wait=wait_exponential(0.05, max=1), retry=retry_if_exception_type(RedisError),
        reraise=True,
    ):
        with attempt:
            await client.ping()  # type: ignore[attr-defined]


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url, embedded = await asyncio.to_thread(redis_url_for, settings)
    client = make_client(url, max_connections=settings.redis_max_connections)
    supervisor: asyncio.Task[None] | None = None
    try:
        await _wait_for_redis(client)
        keys = Keys(settings.key_prefix, settings.hash_key())
        scripts = Scripts(client)
        app[REDIS] = client
        app[KEYS] = keys
        app[SCRIPTS] = scripts
        audit = RedisAuditLog(client, keys)
        app[AUDIT] = audit
        store = RedisRecordStore(client, keys, scripts, sync_enabled=bool(settings.fhir_base_url))
        app[RECORDS] = RecordService(
            store, audit, windows=settings.windows, test_numbers_only=settings.only_test_numbers
        )
        app[ACCESS] = AccessService(
            RedisAccessStore(client, keys, scripts, encounter_ttl_s=settings.retention_access_days * 86400),
            windows=settings.windows,
        )
        registry = app[REGISTRY]
        if registry.care_settings:
            await client.hset(
                keys.care_settings,
                mapping={c.ods: f"{c.name}{SEP}{c.type}" for c in registry.care_settings.values()},
            )
        if embedded is not None:
            app[EMBEDDED] = embedded
            supervisor = asyncio.create_task(embedded.supervise(), name="embedded-redis-supervisor")
        app[LIFECYCLE].redis_ok = True
        yield
    finally:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        await client.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10, connect=5))
    settings = app[SETTINGS]
    app[HTTP] = session
    app[AUTH] = Authenticator(
        app[REGISTRY],
        dev_secret=settings.dev_secret() if settings.dev_mode else None,
        jwks_url=settings.auth_jwks_url,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        session=session,
    )
    yield
    await session.close()


MONITOR_INTERVAL_S = 5.0


def make_monitor(interval_s: float = MONITOR_INTERVAL_S) -> CleanupCtx:
    """A periodic task keeping cpis_redis_up and cpis_ready current between scrapes and /readyz probes."""

    async def monitor_ctx(app: web.Application) -> AsyncIterator[None]:
        metrics, life = app[METRICS], app[LIFECYCLE]

        async def loop() -> None:
            while True:
                try:
                    ok = bool(await asyncio.wait_for(app[REDIS].ping(), timeout=2.0))
                except (RedisError, OSError, TimeoutError):
                    ok = False
                life.redis_ok = ok
                metrics.redis_up.set(1 if ok else 0)
                metrics.ready.set(1 if ok and life.started and not life.draining else 0)
                await asyncio.sleep(interval_s)

        task = asyncio.create_task(loop(), name="redis-monitor")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.ready.set(0)

    return monitor_ctx


monitor_ctx = make_monitor()


async def publish_ready(app: web.Application) -> None:
    """Runs after every cleanup context started: the gauges show the service ready from the first scrape."""
    life = app[LIFECYCLE]
    app[METRICS].ready.set(1 if life.started and life.redis_ok and not life.draining else 0)
    app[METRICS].redis_up.set(1 if life.redis_ok else 0)


def retention_policy(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(
        record_days=settings.retention_record_days,
        access_days=settings.retention_access_days,
        inbox_days=settings.retention_inbox_days,
        audit_days=settings.retention_audit_days,
    )


@contextlib.asynccontextmanager
async def open_retention(settings: Settings) -> AsyncIterator[RetentionService]:
    """For the CLI: the retention service on CPIS_REDIS_URL, else the running embedded Redis (or one started here)."""
    url, embedded = await asyncio.to_thread(redis_url_for, settings)
    client = make_client(url, max_connections=4)
    try:
        await _wait_for_redis(client)
        keys = Keys(settings.key_prefix, settings.hash_key())
        store = RedisRetentionStore(client, keys, Scripts(client))
        yield RetentionService(store, policy=retention_policy(settings), windows=settings.windows)
    finally:
        await client.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def ready_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last in the chain: the app is ready once everything before it started; draining starts first on the way out."""
    app[LIFECYCLE].started = True
    log.info("app.ready")
    yield
    app[LIFECYCLE].draining = True


def create_app(settings: Settings | None = None, *, extra_contexts: list[CleanupCtx] | None = None) -> web.Application:
    settings = settings or Settings()
    if not settings.dev_mode and not settings.redis_url and not settings.allow_embedded_redis:
        raise ConfigurationError(
            "production auth is configured but CPIS_REDIS_URL is not: set it, or CPIS_ALLOW_EMBEDDED_REDIS=true"
        )
    registry = load_registry(settings.registry)
    app = web.Application(middlewares=make_middlewares(), client_max_size=DEFAULT_LIMIT)
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(http_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(monitor_ctx)
    for ctx in extra_contexts or []:
        app.cleanup_ctx.append(ctx)
    app.cleanup_ctx.append(ready_ctx)
    app.on_startup.append(publish_ready)
    la.setup(app)
    app.router.add_routes(ops.routes)
    return app
