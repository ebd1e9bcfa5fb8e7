"""The composition root: open_services(settings) opens the store (CPIS_REDIS_URL, else the embedded server), builds
every concrete adapter (store, FHIR client, notification channels) and the use-cases on them, and closes them in
order; running() starts the background loops on them. Shared by the app and the CLI: the only module (with app.py
and cli.py) that imports adapters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from cpis_bridge.auth import Authenticator
from cpis_bridge.bootstrap import dev_secret, hash_key
from cpis_bridge.config import Settings
from cpis_bridge.core.clock import Clock, utc_now
from cpis_bridge.core.registry import Registry
from cpis_bridge.fhir.client import AuthFailed, FhirClient, FhirUnavailable, make_auth
from cpis_bridge.fhir.flag_server import FhirFlagServer
from cpis_bridge.metrics import Metrics
from cpis_bridge.notify.channels import build_channels, channel_names
from cpis_bridge.notify.observer import MetricsObserver, refresh_gauges
from cpis_bridge.registry import load_registry
from cpis_bridge.services.access import AccessService
from cpis_bridge.services.delivery import DeliveryAdmin, Relay, RelayConfig, RetryPolicy
from cpis_bridge.services.inbox import InboxService
from cpis_bridge.services.records import RecordService
from cpis_bridge.services.retention import RetentionPolicy, RetentionService
from cpis_bridge.services.sync import FlagScheduler, FlagSyncRelay, check_capabilities, sample_backlog
from cpis_bridge.services.uploads import UploadService
from cpis_bridge.store.accesses import RedisAccessStore
from cpis_bridge.store.audit import RedisAuditLog
from cpis_bridge.store.connection import make_client
from cpis_bridge.store.delivery_stats import RedisDeliveryLedger
from cpis_bridge.store.embedded import EmbeddedRedis, socket_answers
from cpis_bridge.store.health import RedisHealth
from cpis_bridge.store.inbox import RedisInbox
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.launch import LaunchContexts
from cpis_bridge.store.outbox import RedisOutbox
from cpis_bridge.store.records import RedisRecordStore
from cpis_bridge.store.replicas import Replicas
from cpis_bridge.store.retention import RedisRetentionStore
from cpis_bridge.store.scripts import Scripts
from cpis_bridge.store.sync import RedisSyncQueue
from cpis_bridge.store.tokens import SeenTokens
from cpis_bridge.store.uploads import RedisUploadStore
from cpis_bridge.store.web import RedisWebSessions, SignInLimiter
from cpis_bridge.web.state import Services
from cpis_bridge.web.uploads import reader_for

log = logging.getLogger("cpis_bridge.compose")

RESUME_INTERVAL_S = 5.0  # uploads left by a process that died are completed within this long
GAUGES_INTERVAL_S = 5.0


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


async def wait_for_redis(client: Redis) -> None:
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(15),
        wait=wait_exponential(0.05, max=1),
        retry=retry_if_exception_type(RedisError),
        reraise=True,
    ):
        with attempt:
            await client.ping()


def unreadable_reporter(metrics: Metrics | None) -> Callable[[str], None]:
    """Told of each stored item a reader skips because it cannot be rendered: logged (its kind only) and counted."""

    def report(item: str) -> None:
        log.warning("read.unreadable_item_skipped", extra={"item": item})
        if metrics is not None:
            metrics.unreadable.labels(item).inc()

    return report


def retention_policy(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(
        record_days=settings.retention_record_days,
        access_days=settings.retention_access_days,
        inbox_days=settings.retention_inbox_days,
        audit_days=settings.retention_audit_days,
    )


def _nothing() -> None:
    pass


def consumer_name() -> str:
    """This process's consumer name in the relays' stream groups."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
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
    """The Flag sync adapters and use-cases for the CPIS_FHIR_* settings."""
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
    queue = RedisSyncQueue(redis, keys, scripts)
    server = FhirFlagServer(FhirClient(settings.fhir_base_url, session, auth), mode=settings.fhir_write_mode)
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
        consumer=consumer_name(),
        first_retry_s=settings.delivery_first_retry_s,
        max_backoff_s=settings.delivery_max_backoff_s,
        clock=clock,
        observe=observe,
        observe_latency=observe_latency,
    )
    return FlagSyncParts(queue, server, relay, FlagScheduler(queue, clock=clock))


@dataclass(frozen=True)
class Opened:
    """What open_services opened: the handlers' Services, the use-cases only the CLI and the background loops use,
    and the store's client (for the tests' and tools' direct reads)."""

    settings: Settings
    registry: Registry
    metrics: Metrics | None
    services: Services
    retention: RetentionService
    outbox: RedisOutbox
    sync: FlagSyncParts | None  # None when CPIS_FHIR_BASE_URL is not set
    redis: Redis
    keys: Keys
    scripts: Scripts
    embedded: EmbeddedRedis | None  # the embedded server when this process started it


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    registry: Registry | None = None,
    metrics: Metrics | None = None,
    fhir_timeout_s: float = 30.0,
) -> AsyncIterator[Opened]:
    """Open the store and build everything on it; closed in reverse on the way out (the embedded server stopped
    only when this process started it)."""
    registry = registry or load_registry(settings.registry)
    report = unreadable_reporter(metrics)
    url, embedded = await asyncio.to_thread(redis_url_for, settings)
    client = make_client(url, max_connections=settings.redis_max_connections, **settings.redis_secrets())
    async with contextlib.AsyncExitStack() as stack:
        if embedded is not None:
            stack.push_async_callback(asyncio.to_thread, embedded.stop)
        stack.push_async_callback(client.aclose)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10, connect=5))
        )
        await wait_for_redis(client)
        keys = Keys(settings.key_prefix, hash_key(settings))
        scripts = Scripts(client, await replicas_for(client, settings, keys))
        audit = RedisAuditLog(client, keys)
        records = RecordService(
            RedisRecordStore(client, keys, scripts, sync_enabled=bool(settings.fhir_base_url)),
            audit,
            windows=settings.windows,
            test_numbers_only=settings.only_test_numbers,
        )
        channels_of = {ods: channel_names(la) for ods, la in registry.local_authorities.items()}
        access_store = RedisAccessStore(
            client,
            keys,
            scripts,
            push_las=[ods for ods, names in channels_of.items() if names],
            encounter_ttl_s=settings.retention_access_days * 86400,
            unreadable=report,
            timeout=settings.redis_timeout_s,
        )
        stack.push_async_callback(access_store.aclose)
        notified = metrics.deliveries.labels("inbox", "delivered").inc if metrics is not None else None
        access = AccessService(access_store, windows=settings.windows, on_notified=notified)
        outbox = RedisOutbox(client, keys, scripts)
        stack.push_async_callback(outbox.aclose)
        auth = Authenticator(
            registry,
            dev_secret=dev_secret(settings) if settings.dev_mode else None,
            jwks_url=settings.auth_jwks_url,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            session=http,
        )
        auth.jti_guard = SeenTokens(client, keys).first_use
        services = Services(
            auth=auth,
            records=records,
            access=access,
            audit=audit,
            inbox=InboxService(
                RedisInbox(client, keys, scripts),
                access_store,
                audit,
                care_settings=registry.care_setting_names,
                unreadable=report,
            ),
            deliveries=DeliveryAdmin(RedisDeliveryLedger(client, keys, scripts), audit, channels_of),
            uploads=UploadService(
                records.writes,
                RedisUploadStore(client, keys, scripts),
                reader_for,
                max_end_fraction=settings.upload_max_end_fraction,
                on_mass_end_refused=metrics.upload_mass_end_refused.inc if metrics else _nothing,
                on_resumed=metrics.uploads_resumed.inc if metrics else _nothing,
            ),
            store=RedisHealth(client),
            sessions=RedisWebSessions(client, keys),
            signin=SignInLimiter(client, keys, limit=settings.web_signin_failures),
            la_signin=SignInLimiter(client, keys, limit=settings.web_signin_la_failures, scope="la"),
            ed_signin=SignInLimiter(client, keys, limit=settings.web_signin_failures, scope="ed"),
            launches=LaunchContexts(client, keys, ttl_s=settings.web_launch_ttl_s),
        )
        sync = None
        if settings.fhir_base_url:
            fhir_http = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=fhir_timeout_s, connect=5))
            )
            sync = flag_sync_parts(settings, client, keys, scripts, fhir_http, metrics=metrics)
        retention = RetentionService(
            RedisRetentionStore(client, keys, scripts, unreadable=report),
            policy=retention_policy(settings),
            windows=settings.windows,
            unreadable=report,
        )
        yield Opened(settings, registry, metrics, services, retention, outbox, sync, client, keys, scripts, embedded)


Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def background(loops: dict[str, Loop], *, grace_s: float = 0.0) -> AsyncIterator[None]:
    """Each loop as a named task sharing one stop event; on the way out the event is set, loops get ``grace_s`` to
    finish, then the rest are cancelled."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(loop(stop), name=name) for name, loop in loops.items()]
    try:
        yield
    finally:
        stop.set()
        alive: set[asyncio.Task[None]] = set(tasks)
        if tasks and grace_s > 0:
            _, alive = await asyncio.wait(tasks, timeout=grace_s)
        for task in alive:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@contextlib.asynccontextmanager
async def delivering(opened: Opened) -> AsyncIterator[None]:
    """This process's delivery relay (webhook and FHIR channels) and its queue gauges; in-flight deliveries finish
    or go back to the queue on the way out."""
    settings, registry = opened.settings, opened.registry
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=settings.relay_concurrency)) as session:
        channels = build_channels(registry, session, settings.env_secret, timeout_s=settings.delivery_timeout_s)
        observer = MetricsObserver(opened.metrics or Metrics())
        observer.endpoints((c.name, la_ods) for la_ods, chans in channels.items() for c in chans)
        relay = Relay(
            opened.outbox,
            lambda la_ods: channels.get(la_ods, ()),
            policy=RetryPolicy(
                settings.delivery_first_retry_s, settings.delivery_max_backoff_s, settings.delivery_max_age_h * 3600
            ),
            config=RelayConfig(
                consumer=consumer_name(),
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
        stats = opened.services.deliveries.stats
        try:
            async with background(
                {"delivery-gauges": lambda stop: refresh_gauges(observer, stats, GAUGES_INTERVAL_S, stop)}
            ):
                yield
        finally:
            await relay.stop(settings.shutdown_grace_s)
            with contextlib.suppress(
                RedisError
            ):  # a consumer left in the group is harmless; its entries stay claimable
                await opened.outbox.forget(relay.config.consumer)


@contextlib.asynccontextmanager
async def syncing(opened: Opened) -> AsyncIterator[None]:
    """Flag sync (docs/contract.md §5): relay, visibility scheduler, CapabilityStatement check and backlog gauges.
    Never blocks start-up: the relay waits for the server itself."""
    parts, metrics = opened.sync, opened.metrics
    assert parts is not None
    await parts.queue.ensure_group()
    loops: dict[str, Loop] = {
        "flag-sync-relay": parts.relay.run,
        "flag-sync-scheduler": parts.scheduler.run,
        "flag-sync-capabilities": lambda stop: check_capabilities(
            parts.server.prepare, stop, transient=(FhirUnavailable, aiohttp.ClientError, AuthFailed)
        ),
    }
    if metrics is not None:
        pending, oldest = metrics.delivery_pending.labels("flag-sync"), metrics.delivery_oldest.labels("flag-sync")

        def backlog(count: int, age: float) -> None:
            pending.set(count)
            oldest.set(age)

        loops["flag-sync-metrics"] = lambda stop: sample_backlog(parts.queue.stats, backlog, stop)
    async with background(loops, grace_s=max(1.0, opened.settings.shutdown_grace_s)):
        yield


@contextlib.asynccontextmanager
async def running(opened: Opened) -> AsyncIterator[None]:
    """The service's background work on what open_services opened: the embedded server's supervisor, the upload
    resumer (uploads left by a process that died), and unless CPIS_RELAYS is false the delivery relay and, with
    CPIS_FHIR_BASE_URL, Flag sync."""
    settings, embedded = opened.settings, opened.embedded
    las = list(opened.registry.local_authorities)
    loops: dict[str, Loop] = {}
    if embedded is not None:
        loops["embedded-redis-supervisor"] = lambda stop: embedded.supervise()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(background(loops))
        if settings.relays:
            await stack.enter_async_context(delivering(opened))
            if opened.sync is not None:
                await stack.enter_async_context(syncing(opened))
        resume = opened.services.uploads.run_resumer
        await stack.enter_async_context(
            background({"upload-resumer": lambda stop: resume(las, stop, RESUME_INTERVAL_S)})
        )
        yield
