"""Notification delivery: the body rendered from its inbox entry (API.md section 6), the retry policy, and the relay
that drains the outbox into each LA's channels (at least once; backoff, Retry-After pauses, dead letters)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from cpis_bridge.core.access import SEP, UNREADABLE, Access, instant, notification_id
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.errors import NotFound
from cpis_bridge.core.ports import AuditLog, Channel, ChannelStats, DeadLetter, DeliveryResult, Outbox, QueueEntry

log = logging.getLogger("cpis_bridge.delivery")
RECENT_SEP = "\x1e"
CLIENT_ERROR_WINDOW_S = 3600.0


# -- the body -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Rendered:
    id: str
    nhs: str
    body: dict[str, Any]

    def encode(self) -> bytes:
        return orjson.dumps(self.body)


_ACCESS_CACHE: dict[tuple[str, str, tuple[str, str] | None], dict[str, Any]] = {}
_ACCESS_CACHE_MAX = 50_000


def _access_api(tag: str, raw: str, names: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """``Access.to_api`` memoised: a child's recent accesses recur in each of its notifications (uuid5 per id)."""
    key = (tag, raw, names.get(raw.partition(SEP)[0]))
    hit = _ACCESS_CACHE.get(key)
    if hit is None:
        if len(_ACCESS_CACHE) >= _ACCESS_CACHE_MAX:
            _ACCESS_CACHE.clear()
        hit = _ACCESS_CACHE[key] = Access.decode(raw).to_api(tag, names)
    return hit


def render(la: str, fields: Mapping[str, str]) -> Rendered:
    """The notification body from the inbox entry fields written by access.lua: a pure function of them, so every
    retry, every relay process and the pull inbox produce the same bytes."""
    tag = fields["tag"]
    names = {ods: _split(v) for ods, v in orjson.loads(fields["cs"] or "{}").items()}
    current = _access_api(tag, fields["acc"], names)
    nid = notification_id(current["id"], la)
    recent_raw = fields.get("recent") or ""
    recent = _recent_api(tag, recent_raw, names)
    created = dt.datetime.fromtimestamp(int(fields["at"]) / 1000, dt.UTC)
    body = {
        "type": "cpis.access",
        "id": nid,
        "createdAt": instant(created),
        "localAuthority": {"ods": la},
        "subject": {"nhsNumber": fields["nhs"]},
        "records": orjson.loads(fields["recs"]),
        "access": current,
        "recentAccesses": recent,
    }
    return Rendered(nid, fields["nhs"], body)


def _recent_api(tag: str, recent_raw: str, names: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """The recent accesses, without any stored one that cannot be decoded: it must not make the notification
    about a later, readable access unbuildable (that access's own notification is what fails)."""
    out = []
    for raw in recent_raw.split(RECENT_SEP):
        if raw:
            try:
                out.append(_access_api(tag, raw, names))
            except UNREADABLE:
                continue
    return out


def _split(value: str) -> tuple[str, str]:
    name, _, kind = value.partition(SEP)
    return name, kind


# -- the retry policy -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """API.md section 6: exponential backoff with jitter from ``first_retry_s`` doubling to ``max_backoff_s``; other
    4xx at the capped interval for an hour; nothing older than ``max_age_s``."""

    first_retry_s: float = 1.0
    max_backoff_s: float = 60.0
    max_age_s: float = 72 * 3600.0
    client_error_window_s: float = CLIENT_ERROR_WINDOW_S

    def backoff(self, failures: int, rnd: float) -> float:
        """Delay before the next attempt after ``failures`` failed ones: "equal jitter" in [base/2, base]."""
        base = min(self.max_backoff_s, self.first_retry_s * float(2 ** min(max(failures - 1, 0), 30)))
        return base / 2 + rnd * base / 2


class DeliveryObserver(Protocol):
    def count(self, channel: str, outcome: str) -> None: ...

    def latency(self, channel: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one channel after an attempt: retry at ``due_ms``, or dead-letter."""

    retry: QueueEntry | None = None
    due_ms: int = 0
    dead: DeadLetter | None = None


def decide(policy: RetryPolicy, entry: QueueEntry, channel: str, result: DeliveryResult, now_ms: int,
           rnd: float) -> Plan:
    """The fate of a failed attempt (pure, so the schedule is unit-testable)."""
    failures = entry.attempt + 1
    deadline = entry.first_ms + int(policy.max_age_s * 1000)
    if result.outcome == "gone":
        return Plan(dead=DeadLetter(channel, "gone", result.status))
    if now_ms >= deadline:
        return Plan(dead=DeadLetter(channel, "max-age", result.status))
    since = 0
    if result.outcome == "client-error":
        since = entry.client_error_since_ms or now_ms
        if now_ms - since >= policy.client_error_window_s * 1000:
            return Plan(dead=DeadLetter(channel, "client-error", result.status))
        delay = policy.max_backoff_s * (0.9 + 0.1 * rnd)
    else:
        delay = policy.backoff(failures, rnd)
    if result.retry_after_s is not None:
        delay = max(delay, result.retry_after_s)
    due = min(now_ms + int(delay * 1000), deadline)
    retry = replace(entry, channel=channel, attempt=failures, client_error_since_ms=since)
    return Plan(retry=retry, due_ms=due)


# -- the relay ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RelayConfig:
    consumer: str
    batch: int = 200
    concurrency: int = 64
    block_ms: int = 500
    claim_idle_ms: int = 60_000
    reclaim_interval_s: float = 5.0
    promote_interval_s: float = 0.25


class Relay:
    """Reads the notification queue as one consumer of the "relays" group and delivers each entry to the LA's
    channels. Many relays (in one process or several) share the work; entries of a dead consumer are reclaimed."""

    def __init__(
        self,
        outbox: Outbox,
        channels: Callable[[str], Sequence[Channel]],
        *,
        policy: RetryPolicy,
        config: RelayConfig,
        observer: DeliveryObserver,
        clock: Callable[[], float] = time.time,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        self.outbox = outbox
        self.channels = channels
        self.policy = policy
        self.config = config
        self.observer = observer
        self.clock = clock
        self.rnd = rnd
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._inflight: set[asyncio.Task[None]] = set()
        self._pauses: dict[tuple[str, str], int] = {}
        self._loops: list[asyncio.Task[None]] = []

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.outbox.ensure_group()
        self._loops = [
            asyncio.create_task(self._read_loop(), name="relay-read"),
            asyncio.create_task(self._every(self.config.promote_interval_s, self._promote), name="relay-promote"),
            asyncio.create_task(self._every(self.config.reclaim_interval_s, self._reclaim), name="relay-reclaim"),
        ]

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop reading, let in-flight deliveries finish for ``grace_s``, then release the rest to other relays."""
        self._stopping.set()
        # Cancelling a blocked read is safe: anything it was handed stays pending in the group for reclaim.
        for task in self._loops:
            task.cancel()
        if self._loops:
            await asyncio.wait(self._loops, timeout=2)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        self._loops = []

    async def _every(self, interval_s: float, step: Callable[[], Any]) -> None:
        while not self._stopping.is_set():
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay.step_failed")
            await asyncio.sleep(interval_s)

    async def _read_loop(self) -> None:
        errors = 0
        while not self._stopping.is_set():
            await self._room.wait()
            try:
                free = self.config.concurrency - len(self._inflight)
                entries = await self.outbox.read(self.config.consumer, min(free, self.config.batch),
                                                 self.config.block_ms)
                errors = 0
                if entries:
                    await self._dispatch(entries)
            except asyncio.CancelledError:
                raise
            except Exception:
                errors += 1
                log.exception("relay.read_failed")
                await asyncio.sleep(min(0.1 * 2**errors, 5.0))

    async def _promote(self) -> None:
        while await self.outbox.promote(self._now_ms(), 500) == 500:
            pass

    async def _reclaim(self) -> None:
        free = self.config.concurrency - len(self._inflight)
        if free <= 0:
            return
        entries = await self.outbox.reclaim(self.config.consumer, self.config.claim_idle_ms, free)
        if entries:
            log.info("relay.reclaimed", extra={"count": len(entries)})
            await self._dispatch(entries)

    async def _dispatch(self, entries: Sequence[QueueEntry]) -> None:
        endpoints = sorted({(e.la, c.name) for e in entries for c in self.channels(e.la)})
        if endpoints:
            loaded, self._pauses = await asyncio.gather(self.outbox.load(entries),
                                                        self.outbox.paused_until(endpoints))
        else:
            loaded = await self.outbox.load(entries)
        for entry, fields in zip(entries, loaded, strict=True):
            task = asyncio.create_task(self._handle(entry, fields))
            self._inflight.add(task)
            task.add_done_callback(self._finished)
        if len(self._inflight) >= self.config.concurrency:
            self._room.clear()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if len(self._inflight) < self.config.concurrency:
            self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("relay.entry_failed", exc_info=task.exception())

    # -- one entry --------------------------------------------------------------------------------------------------
    async def _handle(self, entry: QueueEntry, fields: Mapping[str, str] | None) -> None:
        if fields is None:
            # The inbox entry is gone (purged); nothing left to send, but never drop silently.
            await self.outbox.settle(entry, notification_id=None,
                                     dead=[DeadLetter(entry.channel or "inbox", "inbox-entry-missing")])
            self.observer.count(entry.channel or "inbox", "dead")
            return
        try:
            targets = [c for c in self.channels(entry.la) if entry.channel in (None, c.name)]
            inbox_only_id: str | None = None
            if not targets and entry.channel is None:
                # Inbox only (an LA that lost its push channels after this was queued; inbox-only LAs are not
                # queued at all): the pull inbox renders the body itself; settling needs only the notification id,
                # the same one render() derives.
                access_id = entry.access_id or Access.decode(fields["acc"]).access_id(fields["tag"])
                inbox_only_id = notification_id(access_id, entry.la)
            else:
                rendered = render(entry.la, fields)
            if entry.channel is not None and entry.channel != "inbox" and not targets:
                # The registry no longer names this channel for the LA: nothing to send it to (the pull inbox
                # still holds the notification).
                log.warning("relay.channel_removed", extra={"channel": entry.channel, "la": entry.la})
            results: Sequence[Plan | DeliveryResult | None] = ()
            if inbox_only_id is None:
                results = await asyncio.gather(*(self._attempt(c, entry, rendered) for c in targets))
        except asyncio.CancelledError:
            # Shutting down: hand the entry back, due now, for any relay to pick up.
            await asyncio.shield(self.outbox.settle(entry, notification_id=None, retries=[(entry, self._now_ms())]))
            raise
        retries: list[tuple[QueueEntry, int]] = []
        dead: list[DeadLetter] = []
        now_ms = self._now_ms()
        for channel, result in zip(targets, results, strict=True):
            if result is None:
                continue
            if isinstance(result, Plan):
                plan = result
            else:
                plan = decide(self.policy, entry, channel.name, result, now_ms, self.rnd())
            if plan.retry is not None:
                retries.append((plan.retry, plan.due_ms))
            if plan.dead is not None:
                dead.append(plan.dead)
                log.warning("relay.dead_letter", extra={"channel": channel.name, "la": entry.la,
                                                        "reason": plan.dead.reason, "status": plan.dead.status})
        if inbox_only_id is not None:
            await self.outbox.settle(entry, notification_id=inbox_only_id)
            return
        await self.outbox.settle(entry, notification_id=rendered.id, retries=retries, dead=dead)

    async def _attempt(self, channel: Channel, entry: QueueEntry, rendered: Rendered) -> Plan | DeliveryResult | None:
        """None when delivered; a Plan when the endpoint is paused (no attempt made); else the failed result."""
        now_ms = self._now_ms()
        paused = self._pauses.get((entry.la, channel.name), 0)
        if paused > now_ms:
            return Plan(retry=replace(entry, channel=channel.name), due_ms=paused)
        result = await channel.deliver(entry.la, rendered.id, rendered.nhs, rendered.encode())
        if result.outcome == "delivered":
            self.observer.count(channel.name, "delivered")
            self.observer.latency(channel.name, max(self.clock() - entry.first_ms / 1000, 0.0))
            return None
        if result.retry_after_s is not None:
            until = self._now_ms() + int(result.retry_after_s * 1000)
            self._pauses[(entry.la, channel.name)] = until
            await self.outbox.pause(entry.la, channel.name, until)
        outcome = "dead" if result.outcome == "gone" else "retried"
        self.observer.count(channel.name, outcome)
        log.info("relay.attempt_failed", extra={"channel": channel.name, "la": entry.la, "outcome": result.outcome,
                                                "status": result.status, "attempt": entry.attempt + 1,
                                                "detail": result.detail})
        return result


# -- operations -----------------------------------------------------------------------------------------------------
class DeliveryAdmin:
    """The ops view of deliveries (API.md section 8): per-channel counts and re-queueing a dead letter."""

    def __init__(self, outbox: Outbox, audit: AuditLog, channels_of: Mapping[str, Sequence[str]],
                 clock: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self.audit = audit
        self.channels_of = channels_of
        self.clock = clock

    async def stats(self) -> dict[str, ChannelStats]:
        return await self.outbox.stats(self.channels_of, int(self.clock() * 1000))

    async def deliveries(self, ctx: AuditContext) -> dict[str, Any]:
        stats = await self.stats()
        await self.audit.append(None, ctx.entry("admin.deliveries.read", None, self._now()))
        return {"channels": {name: s.to_api() for name, s in stats.items()}}

    async def retry_dead_letter(self, ctx: AuditContext, dead_id: str) -> None:
        ok = await self.outbox.requeue_dead(dead_id, int(self.clock() * 1000))
        await self.audit.append(None, ctx.entry("admin.dead-letter.retry", None, self._now(), deadLetter=dead_id,
                                                found=ok))
        if not ok:
            raise NotFound("no such dead letter")

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)
