"""create_app(settings): the one place that builds the concrete adapters and wires them into the aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from cpis_bridge.auth import Authenticator
from cpis_bridge.config import Settings
from cpis_bridge.core.access import SEP
from cpis_bridge.core.backoff import Backoff
from cpis_bridge.core.clock import Clock, epoch_ms, utc_now
from cpis_bridge.fhir.client import AuthFailed, FhirClient, FhirUnavailable, make_auth
from cpis_bridge.fhir.flag_server import FhirFlagServer
from cpis_bridge.metrics import Metrics
from cpis_bridge.notify.channels import channel_names
from cpis_bridge.registry import load_registry
from cpis_bridge.services.access import AccessService
from cpis_bridge.services.records import RecordService
from cpis_bridge.services.retention import RetentionPolicy, RetentionService
from cpis_bridge.services.sync import FlagScheduler, FlagSyncRelay
from cpis_bridge.store.accesses import RedisAccessStore
from cpis_bridge.store.audit import RedisAuditLog
from cpis_bridge.store.connection import make_client
from cpis_bridge.store.embedded import EmbeddedRedis, socket_answers
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.records import RedisRecordStore
from cpis_bridge.store.replicas import Replicas
from cpis_bridge.store.retention import RedisRetentionStore
from cpis_bridge.store.scripts import Scripts
from cpis_bridge.store.sync import RedisSyncQueue
from cpis_bridge.store.tokens import SeenTokens
from cpis_bridge.web import admin, cds, fhir, la, notifications, openapi, ops, views
from cpis_bridge.web.middlewares import DEFAULT_LIMIT, make_middlewares
from cpis_bridge.web.server import HANDLER_ARGS
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
    SCRIPTS,
    SETTINGS,
    Lifecycle,
)

log = logging.getLogger("cpis_bridge.app")

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]
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


async def replicas_for(client: Redis, settings: Settings, keys: Keys) -> Replicas:
    """CPIS_REDIS_MIN_REPLICAS and how this server confirms (WAIT or WAITAOF)."""
    return await Replicas.for_server(
        client,
        settings.redis_min_replicas,
        settings.redis_replica_timeout_s,
        fence_key=keys.replica_fence,
        mode=settings.redis_confirm,
    )


async def _wait_for_redis(client: object) -> None:
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(15),
        wait=wait_exponential(0.05, max=1),
        retry=retry_if_exception_type(RedisError),
        reraise=True,
    ):
        with attempt:
            await client.ping()  # type: ignore[attr-defined]


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url, embedded = await asyncio.to_thread(redis_url_for, settings)
    client = make_client(url, max_connections=settings.redis_max_connections, **settings.redis_secrets())
    supervisor: asyncio.Task[None] | None = None
    access_store: RedisAccessStore | None = None
    try:
        await _wait_for_redis(client)
        keys = Keys(settings.key_prefix, settings.hash_key())
        scripts = Scripts(client, await replicas_for(client, settings, keys))
        app[REDIS] = client
        app[KEYS] = keys
        app[SCRIPTS] = scripts
        audit = RedisAuditLog(client, keys)
        app[AUDIT] = audit
        store = RedisRecordStore(client, keys, scripts, sync_enabled=bool(settings.fhir_base_url))
        app[RECORDS] = RecordService(
            store, audit, windows=settings.windows, test_numbers_only=settings.only_test_numbers
        )
        registry = app[REGISTRY]
        push_las = [ods for ods, la_entry in registry.local_authorities.items() if channel_names(la_entry)]
        access_store = RedisAccessStore(
            client,
            keys,
            scripts,
            push_las=push_las,
            encounter_ttl_s=settings.retention_access_days * 86400,
            unreadable=unreadable_reporter(app[METRICS]),
            timeout=settings.redis_timeout_s,
        )
        inbox_delivered = app[METRICS].deliveries.labels("inbox", "delivered")
        app[ACCESS] = AccessService(access_store, windows=settings.windows, on_notified=inbox_delivered.inc)
        app[AUTH].jti_guard = SeenTokens(client, keys).first_use
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
        if access_store is not None:
            await access_store.aclose()
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


async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    """The pull inbox and delivery admin services, and (unless settings.relays is False) this process's relay:
    started after Redis, stopped before it on shutdown (in-flight deliveries finish or go back to the queue)."""
    import os
    import secrets
    import socket

    from cpis_bridge.notify.channels import build_channels
    from cpis_bridge.notify.observer import MetricsObserver, refresh_gauges
    from cpis_bridge.services.delivery import DeliveryAdmin, Relay, RelayConfig, RetryPolicy
    from cpis_bridge.services.inbox import InboxService
    from cpis_bridge.store.delivery_stats import RedisDeliveryLedger
    from cpis_bridge.store.inbox import RedisInbox
    from cpis_bridge.store.outbox import RedisOutbox

    settings, registry = app[SETTINGS], app[REGISTRY]
    client, keys = app[REDIS], app[KEYS]
    outbox = RedisOutbox(client, keys, app[SCRIPTS])
    channels_of = {ods: channel_names(la) for ods, la in registry.local_authorities.items()}
    admin_service = DeliveryAdmin(RedisDeliveryLedger(client, keys, app[SCRIPTS]), app[AUDIT], channels_of)
    app[admin.DELIVERIES] = admin_service
    notifications.setup(
        app,
        InboxService(
            RedisInbox(client, keys, app[SCRIPTS]),
            app[ACCESS].store,
            app[AUDIT],
            care_settings=registry.care_setting_names,
            unreadable=unreadable_reporter(app[METRICS]),
        ),
    )
    if not settings.relays:
        yield
        await outbox.aclose()
        return
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=settings.relay_concurrency))
    channels = build_channels(registry, session, settings.env_secret, timeout_s=settings.delivery_timeout_s)
    observer = MetricsObserver(app[METRICS])
    observer.endpoints((c.name, la_ods) for la_ods, chans in channels.items() for c in chans)
    relay = Relay(
        outbox,
        lambda la_ods: channels.get(la_ods, ()),
        policy=RetryPolicy(
            settings.delivery_first_retry_s, settings.delivery_max_backoff_s, settings.delivery_max_age_h * 3600
        ),
        config=RelayConfig(
            consumer=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}",
            concurrency=settings.relay_concurrency,
            endpoint_concurrency=settings.delivery_endpoint_concurrency,
            breaker_failures=settings.delivery_breaker_failures,
            breaker_cooldown_s=settings.delivery_breaker_cooldown_s,
            claim_idle_ms=int(settings.relay_claim_idle_s * 1000),
            reclaim_interval_s=settings.relay_reclaim_interval_s,
            promote_interval_s=min(0.25, settings.delivery_first_retry_s / 2),
        ),
        observer=observer,
    )
    await relay.start()
    gauges_stop = asyncio.Event()
    gauges = asyncio.create_task(
        refresh_gauges(observer, admin_service.stats, 5.0, gauges_stop), name="delivery-gauges"
    )
    try:
        yield
    finally:
        gauges_stop.set()
        gauges.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gauges
        await relay.stop(settings.shutdown_grace_s)
        with contextlib.suppress(RedisError):  # a consumer left in the group is harmless; its entries stay claimable
            await outbox.forget(relay.config.consumer)
        await session.close()
        await outbox.aclose()


@dataclass
class FlagSyncParts:
    queue: RedisSyncQueue
    server: FhirFlagServer
    relay: FlagSyncRelay
    scheduler: FlagScheduler


def flag_sync_parts(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    scripts: Scripts,
    session: aiohttp.ClientSession,
    *,
    metrics: Metrics | None = None,
    clock: Clock = utc_now,
) -> FlagSyncParts:
    """The Flag sync adapters and use-cases for CPIS_FHIR_* settings (also used by `cpis-bridge reconcile`)."""
    assert settings.fhir_base_url
    auth = make_auth(
        settings.fhir_auth_mode,
        token=settings.fhir_auth_token,
        token_url=settings.fhir_auth_token_url,
        client_id=settings.fhir_auth_client_id,
        client_secret=settings.fhir_auth_client_secret,
        private_key_file=settings.fhir_auth_private_key_file,
        kid=settings.fhir_auth_kid,
        alg=settings.fhir_auth_alg,
        scope=settings.fhir_auth_scope,
    )
    client = FhirClient(settings.fhir_base_url, session, auth)
    queue = RedisSyncQueue(redis, keys, scripts)
    server = FhirFlagServer(client, mode=settings.fhir_write_mode)
    observe = observe_latency = None
    if metrics is not None:
        observe_latency = metrics.delivery_latency.labels("flag-sync").observe
        counters = {o: metrics.deliveries.labels("flag-sync", o) for o in ("delivered", "retried", "dead")}

        def observe(outcome: str, n: int) -> None:
            counters[outcome].inc(n)

    relay = FlagSyncRelay(
        queue,
        server,
        windows=settings.windows,
        consumer=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        first_retry_s=settings.delivery_first_retry_s,
        max_backoff_s=settings.delivery_max_backoff_s,
        clock=clock,
        observe=observe,
        observe_latency=observe_latency,
    )
    return FlagSyncParts(queue, server, relay, FlagScheduler(queue, clock=clock))


async def _check_capabilities(server: FhirFlagServer, stop: asyncio.Event) -> None:
    """Start-up check of the CapabilityStatement; retried in the background, never blocking start."""
    backoff = Backoff(1.0, 60.0, jitter=False)
    for _ in range(20):
        delay = backoff.next()
        try:
            await server.prepare()
            return
        except (FhirUnavailable, aiohttp.ClientError, AuthFailed) as exc:
            log.warning("fhir.capabilities.unavailable", extra={"error": str(exc), "retryInS": delay})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return


async def _sample_sync_metrics(queue: RedisSyncQueue, metrics: Metrics, stop: asyncio.Event) -> None:
    pending, oldest = metrics.delivery_pending.labels("flag-sync"), metrics.delivery_oldest.labels("flag-sync")
    while not stop.is_set():
        with contextlib.suppress(RedisError):
            count, age = await queue.stats(epoch_ms(utc_now()))
            pending.set(count)
            oldest.set(age)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5.0)


async def sync_ctx(app: web.Application) -> AsyncIterator[None]:
    """Flag sync (docs/contract.md §5): relay, visibility scheduler and CapabilityStatement check, only when
    CPIS_FHIR_BASE_URL is set and relays run. Never blocks start-up: the relay waits for the server itself."""
    settings = app[SETTINGS]
    if not settings.fhir_base_url or not settings.relays:
        yield
        return
    stop = asyncio.Event()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, connect=5))
    parts = flag_sync_parts(settings, app[REDIS], app[KEYS], app[SCRIPTS], session, metrics=app[METRICS])
    await parts.queue.ensure_group()
    tasks = [
        asyncio.create_task(parts.relay.run(stop), name="flag-sync-relay"),
        asyncio.create_task(parts.scheduler.run(stop), name="flag-sync-scheduler"),
        asyncio.create_task(_check_capabilities(parts.server, stop), name="flag-sync-capabilities"),
        asyncio.create_task(_sample_sync_metrics(parts.queue, app[METRICS], stop), name="flag-sync-metrics"),
    ]
    try:
        yield
    finally:
        stop.set()
        _, alive = await asyncio.wait(tasks, timeout=max(1.0, settings.shutdown_grace_s))
        for task in alive:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await session.close()


MONITOR_INTERVAL_S = 5.0


def make_monitor(interval_s: float = MONITOR_INTERVAL_S) -> CleanupCtx:
    """A periodic task keeping cpis_redis_up and cpis_ready current between scrapes and /readyz probes."""

    async def monitor_ctx(app: web.Application) -> AsyncIterator[None]:
        metrics, life = app[METRICS], app[LIFECYCLE]
        stop = asyncio.Event()

        async def loop() -> None:
            # Ends on the stop event, not on cancellation alone: Python 3.11's wait_for can swallow a cancel.
            while not stop.is_set():
                try:
                    async with asyncio.timeout(2.0):
                        ok = bool(await app[REDIS].ping())
                except (RedisError, OSError, TimeoutError):
                    ok = False
                life.redis_ok = ok
                metrics.redis_up.set(1 if ok else 0)
                metrics.ready.set(1 if ok and life.started and not life.draining else 0)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await stop.wait()

        task = asyncio.create_task(loop(), name="redis-monitor")
        yield
        stop.set()
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


def unreadable_reporter(metrics: Metrics | None) -> Callable[[str], None]:
    """Told of each stored item a reader skips because it cannot be rendered: logged (its kind only) and counted."""

    def report(item: str) -> None:
        log.warning("read.unreadable_item_skipped", extra={"item": item})
        if metrics is not None:
            metrics.unreadable.labels(item).inc()

    return report


@contextlib.asynccontextmanager
async def open_retention(settings: Settings) -> AsyncIterator[RetentionService]:
    """For the CLI: the retention service on CPIS_REDIS_URL, else the running embedded Redis (or one started here)."""
    url, embedded = await asyncio.to_thread(redis_url_for, settings)
    client = make_client(url, max_connections=4, **settings.redis_secrets())
    try:
        await _wait_for_redis(client)
        keys = Keys(settings.key_prefix, settings.hash_key())
        report = unreadable_reporter(None)
        scripts = Scripts(client, await replicas_for(client, settings, keys))
        store = RedisRetentionStore(client, keys, scripts, unreadable=report)
        yield RetentionService(store, policy=retention_policy(settings), windows=settings.windows, unreadable=report)
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
    app = web.Application(middlewares=make_middlewares(), client_max_size=DEFAULT_LIMIT, handler_args=HANDLER_ARGS)
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(http_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(cds.http_ctx)
    app.cleanup_ctx.append(delivery_ctx)
    app.cleanup_ctx.append(sync_ctx)
    app.cleanup_ctx.append(monitor_ctx)
    for ctx in extra_contexts or []:
        app.cleanup_ctx.append(ctx)
    app.cleanup_ctx.append(ready_ctx)
    app.on_startup.append(publish_ready)
    la.setup(app)
    openapi.setup(app)
    fhir.setup(app)
    cds.setup(app)
    app.router.add_routes(ops.routes)
    app.router.add_routes(notifications.routes)
    app.router.add_routes(admin.routes)
    views.setup(app)
    return app
