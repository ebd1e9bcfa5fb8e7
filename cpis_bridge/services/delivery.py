"""Notification delivery: the body rendered from its inbox entry (docs/contract.md §6), the retry policy, and the relay
that drains the outbox into each LA's channels (at least once; backoff, Retry-After pauses, dead letters), each
endpoint isolated from the others (a concurrency cap and a circuit breaker per endpoint)."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import random
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from cpis_bridge.core.access import SEP, UNREADABLE, Access, instant, notification_id
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.backoff import Backoff, backoff_s
from cpis_bridge.core.clock import EpochClock, epoch_s
from cpis_bridge.core.errors import NotFound
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import (
    AuditLog,
    Channel,
    ChannelStats,
    DeadLetter,
    DeliveryLedger,
    DeliveryOutcome,
    DeliveryResult,
    Outbox,
    QueueEntry,
)

log = logging.getLogger("cpis_bridge.delivery")
RECENT_SEP = "\x1e"
CLIENT_ERROR_WINDOW_S = 3600.0
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
MAX_ENTRY_PART = 2**64 - 1


def is_entry_id(text: str) -> bool:
    """A queue or inbox entry id as the store makes them (``<ms>-<seq>``, each at most 2^64 - 1): anything else
    (a longer number, a trailing newline) is refused before it reaches the store, which would call it an error."""
    m = _ENTRY_ID.fullmatch(text)
    return m is not None and int(m[1]) <= MAX_ENTRY_PART and int(m[2]) <= MAX_ENTRY_PART


# -- the body -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Rendered:
    id: str
    nhs: NhsNumber
    body: dict[str, Any]

    def encode(self) -> bytes:
        return orjson.dumps(self.body)


def _access_api(tag: str, raw: str, names: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """``Access.to_api`` memoised: a child's recent accesses recur in each of its notifications (uuid5 per id). The
    stored access starts with its care setting's ODS code, the only name ``to_api`` reads."""
    ods = raw.partition(SEP)[0]
    return _access_api_of(tag, raw, ods, names.get(ods))


@functools.lru_cache(maxsize=50_000)
def _access_api_of(tag: str, raw: str, ods: str, setting: tuple[str, str] | None) -> dict[str, Any]:
    """Shared between notification bodies, which only serialise it: never mutate it."""
    return Access.decode(raw).to_api(tag, {} if setting is None else {ods: setting})


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
    return Rendered(nid, NhsNumber(fields["nhs"]), body)  # as access.lua stored it: checked on the way in


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
    """docs/contract.md §6: exponential backoff with jitter from ``first_retry_s`` doubling to ``max_backoff_s``; other
    4xx at the capped interval for an hour; nothing older than ``max_age_s``."""

    first_retry_s: float = 1.0
    max_backoff_s: float = 60.0
    max_age_s: float = 72 * 3600.0
    client_error_window_s: float = CLIENT_ERROR_WINDOW_S

    def backoff(self, failures: int, rnd: float) -> float:
        """Delay before the next attempt after ``failures`` failed ones: "equal jitter" in [base/2, base]."""
        return backoff_s(failures, self.first_retry_s, self.max_backoff_s, rnd)


class DeliveryObserver(Protocol):
    def count(self, channel: str, outcome: str) -> None: ...

    def latency(self, channel: str, seconds: float) -> None: ...

    def breaker(self, channel: str, la: str, state: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one channel after an attempt: retry at ``due_ms``, or dead-letter."""

    retry: QueueEntry | None = None
    due_ms: int = 0
    dead: DeadLetter | None = None


def decide(
    policy: RetryPolicy, entry: QueueEntry, channel: str, result: DeliveryResult, now_ms: int, rnd: float
) -> Plan:
    """The fate of a failed attempt (pure, so the schedule is unit-testable)."""
    failures = entry.attempt + 1
    deadline = entry.first_ms + int(policy.max_age_s * 1000)
    if result.outcome == DeliveryOutcome.GONE:
        return Plan(dead=DeadLetter(channel, "gone", result.status))
    if now_ms >= deadline:
        return Plan(dead=DeadLetter(channel, "max-age", result.status))
    since = 0
    if result.outcome == DeliveryOutcome.CLIENT_ERROR:
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


# -- endpoint isolation -----------------------------------------------------------------------------------------
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
HORIZON_S = 1.0  # a working endpoint may have about this much of its recent throughput waiting in this process
RELEASE_ALL = 500


@dataclass(slots=True)
class Breaker:
    """One endpoint's circuit breaker in one process: opens after ``threshold`` consecutive transient failures
    (timeouts, refused or reset connections, 5xx, 408/425/429), lets one probe through once ``cooldown_s`` has
    passed (half-open), closes when an attempt gets any other answer, and opens again when the probe fails."""

    threshold: int
    cooldown_s: float
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0

    def advance(self, now: float) -> str | None:
        """Open -> half-open once the cool-down is over; returns the new state when it changed."""
        if self.state == OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = HALF_OPEN
            return HALF_OPEN
        return None

    def record(self, ok: bool, now: float) -> str | None:
        """Count one attempt's outcome; returns the new state when it changed."""
        if ok:
            self.failures = 0
            if self.state == CLOSED:
                return None
            self.state = CLOSED
            return CLOSED
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            self.state = OPEN
            self.opened_at = now
            return OPEN
        return None


@dataclass(eq=False, slots=True)
class _Job:
    """One queue entry in this relay: its body (built once for all its channels) and what each channel came to,
    settled in one atomic step when the last of them is decided."""

    entry: QueueEntry
    open: int = 0
    rendered: Rendered | None = None
    body: bytes = b""
    nid: str | None = None
    retries: list[tuple[QueueEntry, int]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    holds: list[QueueEntry] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Waiting:
    job: _Job
    since: float


class _Endpoint:
    """One LA channel as this relay sees it: deliveries running, entries read and waiting for a turn, recent
    completions (its throughput), and its breaker."""

    __slots__ = ("breaker", "channel", "done", "incoming", "la", "probe_at", "running", "waiting")

    def __init__(self, la: str, channel: Channel, breaker: Breaker) -> None:
        self.la = la
        self.channel = channel
        self.breaker = breaker
        self.running = 0
        self.incoming = 0  # routed here, body still loading
        self.waiting: deque[_Waiting] = deque()
        self.done: deque[float] = deque(maxlen=64)
        self.probe_at = 0.0

    def taken(self) -> int:
        return self.running + len(self.waiting) + self.incoming

    def allowance(self, now: float, cap: int, ceiling: int) -> int:
        """How many entries this process takes on for the endpoint: about HORIZON_S of its recent throughput, and
        at least twice its cap, which is all a hung endpoint (no recent completion) gets."""
        floor = 2 * cap
        if len(self.done) < 2 or now <= self.done[0]:
            return floor
        rate = len(self.done) / (now - self.done[0])
        return max(floor, min(int(rate * HORIZON_S), ceiling))


# -- the relay ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RelayConfig:
    consumer: str
    batch: int = 200
    concurrency: int = 64
    endpoint_concurrency: int = 32
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    block_ms: int = 500
    claim_idle_ms: int = 60_000
    reclaim_interval_s: float = 5.0
    promote_interval_s: float = 0.25


class Relay:
    """Reads the notification queue as one consumer of the "relays" group and delivers each entry to the LA's
    channels. Many relays (in one process or several) share the work; entries of a dead consumer are reclaimed.

    Endpoints (LA + channel) are isolated: at most ``endpoint_concurrency`` deliveries run per endpoint, and an entry
    is read only when the relay can take it on. An entry for an endpoint that cannot take it now (breaker open,
    or already given all this process allows it) is set aside in Redis for that endpoint in the step that
    acknowledges it, without an attempt, and put back on the queue when the endpoint can take it (half-open probe,
    free room): a hung endpoint holds a few slots and nothing else, however much is queued for it."""

    def __init__(
        self,
        outbox: Outbox,
        channels: Callable[[str], Sequence[Channel]],
        *,
        policy: RetryPolicy,
        config: RelayConfig,
        observer: DeliveryObserver,
        clock: EpochClock = epoch_s,
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
        self._running = 0  # deliveries in flight: the relay's slots
        self._waiting = 0  # entries read and waiting for their endpoint, all endpoints
        self._buffer = max(config.concurrency, config.batch)
        self._hold_after_s = max(1.0, config.claim_idle_ms / 4000)  # well before another relay would reclaim it
        self._max_age_ms = int(policy.max_age_s * 1000)
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}
        self._starved: set[_Endpoint] = set()  # waiting for a free slot
        self._tasks: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()
        self._mine: set[str] = set()  # entry ids taken on and not yet settled: never handed to a second sender
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
            asyncio.create_task(self._every(self.config.promote_interval_s, self._tend), name="relay-tend"),
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
        now_ms = self._now_ms()
        for ep in self._endpoints.values():  # not started: back to the queue, due now, for any relay
            while ep.waiting:
                job = self._unwait(ep).job
                self._decided(job, retry=(replace(job.entry, channel=ep.channel.name), now_ms))
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=5)
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

    def _free(self) -> int:
        """How many entries the relay can take on now."""
        return min(self.config.batch, self.config.concurrency - self._running, self._buffer - self._waiting)

    def _update_room(self) -> None:
        if self._free() > 0:
            self._room.set()
        else:
            self._room.clear()

    async def _read_loop(self) -> None:
        errors = Backoff(0.2, 5.0, jitter=False)
        while not self._stopping.is_set():
            await self._room.wait()
            free = self._free()
            if free <= 0:
                self._room.clear()
                continue
            try:
                entries = await self.outbox.read(self.config.consumer, free, self.config.block_ms)
                errors.reset()
                if entries:
                    await self._dispatch(entries)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay.read_failed")
                await asyncio.sleep(errors.next())

    async def _promote(self) -> None:
        while await self.outbox.promote(self._now_ms(), 500) == 500:
            pass

    async def _reclaim(self) -> None:
        if self._mine:
            # Still ours (waiting, in flight or settling): reset their idle time so that no relay, this one
            # included, reclaims them as abandoned while an attempt may be running (a second, concurrent send).
            await self.outbox.touch(self.config.consumer, sorted(self._mine))
        free = self._free()
        if free <= 0:
            return
        entries = await self.outbox.reclaim(self.config.consumer, self.config.claim_idle_ms, free)
        if entries:
            log.info("relay.reclaimed", extra={"count": len(entries)})
            await self._dispatch(entries)

    async def _tend(self) -> None:
        """Entries waiting here too long (a slow endpoint) are set aside; held entries go back on the queue as
        their endpoint can take them (room when closed, one probe when half-open) or once past the maximum age."""
        now, now_ms = self.clock(), self._now_ms()
        for ep in list(self._endpoints.values()):
            self._state(ep, now)
            while ep.waiting and now - ep.waiting[0].since > self._hold_after_s:
                self._set_aside(self._unwait(ep).job, ep, now_ms)
        self._update_room()
        for la, name in await self.outbox.held_endpoints():
            if self._stopping.is_set():
                return
            named = self._endpoint_named(la, name)
            await self.outbox.release(la, name, self._releasable(named, now), now_ms - self._max_age_ms)

    def _releasable(self, ep: _Endpoint | None, now: float) -> int:
        if ep is None:
            return RELEASE_ALL  # the LA no longer has this channel: the relay settles them without sending
        state = self._state(ep, now)
        if state == CLOSED:
            return max(self._allowance(ep, now) - ep.taken(), 0)
        if state == HALF_OPEN and ep.taken() == 0 and now - ep.probe_at >= 1.0:
            ep.probe_at = now
            return 1
        return 0

    # -- routing ----------------------------------------------------------------------------------------------------
    def _endpoint(self, la: str, channel: Channel) -> _Endpoint:
        ep = self._endpoints.get((la, channel.name))
        if ep is None or ep.channel is not channel:
            breaker = Breaker(self.config.breaker_failures, self.config.breaker_cooldown_s)
            ep = self._endpoints[(la, channel.name)] = _Endpoint(la, channel, breaker)
        return ep

    def _endpoint_named(self, la: str, name: str) -> _Endpoint | None:
        for channel in self.channels(la):
            if channel.name == name:
                return self._endpoint(la, channel)
        return None

    def _allowance(self, ep: _Endpoint, now: float) -> int:
        return ep.allowance(now, self.config.endpoint_concurrency, self._buffer)

    def _state(self, ep: _Endpoint, now: float) -> str:
        changed = ep.breaker.advance(now)
        if changed is not None:
            self._transition(ep, changed)
        return ep.breaker.state

    def _transition(self, ep: _Endpoint, state: str) -> None:
        extra = {"la": ep.la, "channel": ep.channel.name}
        self.observer.breaker(ep.channel.name, ep.la, state)
        if state == OPEN:
            log.warning(
                "delivery.breaker_open",
                extra={**extra, "failures": ep.breaker.failures, "cooldown_s": ep.breaker.cooldown_s},
            )
            now_ms = self._now_ms()
            while ep.waiting:
                self._set_aside(self._unwait(ep).job, ep, now_ms)
        elif state == HALF_OPEN:
            log.info("delivery.breaker_half_open", extra=extra)
        else:
            log.info("delivery.breaker_closed", extra=extra)

    def _can_take(self, ep: _Endpoint, now: float) -> bool:
        state = self._state(ep, now)
        if state == CLOSED:
            return ep.taken() < self._allowance(ep, now)
        return state == HALF_OPEN and ep.taken() == 0  # the one probe

    def _set_aside(self, job: _Job, ep: _Endpoint, now_ms: int) -> None:
        """Not now: held for the endpoint (no attempt counted), or dead-lettered when past the maximum age."""
        if now_ms >= job.entry.first_ms + self._max_age_ms:
            self._decided(job, dead=DeadLetter(ep.channel.name, "max-age"))
        else:
            self._decided(job, hold=replace(job.entry, channel=ep.channel.name))

    def _unwait(self, ep: _Endpoint) -> _Waiting:
        self._waiting -= 1
        return ep.waiting.popleft()

    async def _dispatch(self, entries: Sequence[QueueEntry]) -> None:
        # An entry this relay already holds (reclaimed from itself, read twice) is not taken on again: its first
        # copy is being handled, and two copies would be two concurrent attempts of one notification.
        entries = [e for e in entries if e.id not in self._mine]
        taken = {e.id for e in entries}
        self._mine.update(taken)
        try:
            await self._take_on(entries)
        except BaseException:
            # Redis failed before these reached an attempt (reading pauses or bodies): they are still pending in the
            # group and must stay reclaimable, by this relay too, never held here (and kept fresh by touch) forever.
            self._mine.difference_update(taken)
            raise

    async def _take_on(self, entries: Sequence[QueueEntry]) -> None:
        endpoints = sorted({(e.la, c.name) for e in entries for c in self.channels(e.la)})
        if endpoints:
            paused = await self.outbox.paused_until(endpoints)
            for key in endpoints:
                self._pauses.pop(key, None)
            self._pauses.update(paused)
        now, now_ms = self.clock(), self._now_ms()
        to_load: list[tuple[_Job, list[_Endpoint], list[Channel]]] = []
        for entry in entries:
            job = _Job(entry)
            targets = [c for c in self.channels(entry.la) if entry.channel in (None, c.name)]
            if entry.problem:
                self._give_up(job, targets, "unbuildable", entry.problem)
                continue
            local: list[_Endpoint] = []
            for channel in targets:
                ep = self._endpoint(entry.la, channel)
                paused_until = self._pauses.get((entry.la, channel.name), 0)
                if paused_until > now_ms:  # Retry-After: wait it out, no attempt counted
                    job.retries.append((replace(entry, channel=channel.name), paused_until))
                elif self._can_take(ep, now):
                    ep.incoming += 1
                    local.append(ep)
                elif now_ms >= entry.first_ms + self._max_age_ms:
                    job.dead.append(DeadLetter(channel.name, "max-age"))
                else:
                    job.holds.append(replace(entry, channel=channel.name))
            if local or not targets:
                to_load.append((job, local, targets))
            else:
                self._settle_later(job)
        if to_load:
            try:
                loaded = await self.outbox.load([job.entry for job, _, _ in to_load])
            finally:
                for _, local, _ in to_load:
                    for ep in local:
                        ep.incoming -= 1
            now = self.clock()
            for (job, local, targets), fields in zip(to_load, loaded, strict=True):
                self._admit(job, local, targets, fields, now)
        self._update_room()

    def _admit(
        self,
        job: _Job,
        local: list[_Endpoint],
        targets: list[Channel],
        fields: Mapping[str, str] | Exception | None,
        now: float,
    ) -> None:
        """Build the body once, then queue the entry at each of its endpoints (or settle it: nothing to send, or a
        body that cannot be built, which is dead-lettered at once: retrying cannot fix stored data)."""
        entry = job.entry
        if fields is None:
            # The inbox entry is gone (purged); nothing left to send, but never drop silently.
            self._give_up(job, targets, "inbox-entry-missing")
            return
        try:
            if isinstance(fields, Exception):
                raise fields
            if not targets:
                # Inbox only (an LA that lost its push channels after this was queued; inbox-only LAs are not
                # queued at all), or a channel the registry no longer names for the LA (the pull inbox still holds
                # the notification): settling needs only the notification id, the one render() derives.
                if entry.channel not in (None, "inbox"):
                    log.warning("relay.channel_removed", extra={"channel": entry.channel, "la": entry.la})
                access_id = entry.access_id or Access.decode(fields["acc"]).access_id(fields["tag"])
                job.nid = notification_id(access_id, entry.la)
                self._settle_later(job)
                return
            job.rendered = render(entry.la, fields)
            job.body = job.rendered.encode()
            job.nid = job.rendered.id
        except Exception as exc:
            detail = f"{'load' if isinstance(fields, Exception) else 'render'}: {type(exc).__name__}"
            log.warning("relay.unbuildable", extra={"la": entry.la, "detail": detail})
            self._give_up(job, targets, "unbuildable", detail)
            return
        job.open = len(local)
        for ep in local:
            ep.waiting.append(_Waiting(job, now))
            self._waiting += 1
        for ep in local:
            self._pump(ep)

    def _give_up(self, job: _Job, targets: Sequence[Channel], reason: str, detail: str = "") -> None:
        """Dead-letter every channel of the entry (its own channel, or "inbox" when it has none to send to)."""
        names = [c.name for c in targets] or [job.entry.channel or "inbox"]
        job.retries.clear()
        job.holds.clear()
        job.dead = [DeadLetter(name, reason, detail=detail) for name in names]
        self._settle_later(job)

    def _pump(self, ep: _Endpoint) -> None:
        """Start what the endpoint can take now: up to its cap when closed, the one probe when half-open."""
        now = self.clock()
        state = self._state(ep, now)  # an endpoint opening sets its waiting entries aside
        limit = self.config.endpoint_concurrency if state == CLOSED else (1 if state == HALF_OPEN else 0)
        now_ms = int(now * 1000)
        if state == OPEN:  # it opened while these were loading
            while ep.waiting:
                self._set_aside(self._unwait(ep).job, ep, now_ms)
        while ep.waiting and ep.running < limit:
            if self._running >= self.config.concurrency:
                self._starved.add(ep)
                break
            job = self._unwait(ep).job
            paused_until = self._pauses.get((ep.la, ep.channel.name), 0)
            if paused_until > now_ms:
                self._decided(job, retry=(replace(job.entry, channel=ep.channel.name), paused_until))
                continue
            ep.running += 1
            self._running += 1
            task = asyncio.create_task(self._deliver(ep, job))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, ep))

    def _finished(self, ep: _Endpoint, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("relay.entry_failed", exc_info=task.exception())
        if not self._stopping.is_set():
            self._pump(ep)
            for other in list(self._starved):
                if self._running >= self.config.concurrency:
                    break
                self._starved.discard(other)
                self._pump(other)
        self._update_room()

    # -- one delivery -----------------------------------------------------------------------------------------------
    async def _deliver(self, ep: _Endpoint, job: _Job) -> None:
        entry, channel = job.entry, ep.channel
        assert job.rendered is not None and job.nid is not None
        try:
            result = await channel.deliver(entry.la, job.nid, job.rendered.nhs, job.body)
        except asyncio.CancelledError:
            # Shutting down: hand the channel back, due now, for any relay to pick up.
            self._decided(job, retry=(replace(entry, channel=channel.name), self._now_ms()))
            raise
        except Exception as exc:
            # The channel could not make a request of this body: retrying cannot fix stored data.
            detail = f"{channel.name}: {type(exc).__name__}"
            log.warning("relay.unbuildable", extra={"la": entry.la, "detail": detail})
            self._decided(job, dead=DeadLetter(channel.name, "unbuildable", detail=detail))
            return
        finally:
            ep.running -= 1
            self._running -= 1
            ep.done.append(self.clock())
        changed = ep.breaker.record(result.outcome != DeliveryOutcome.TRANSIENT, self.clock())
        if changed is not None:
            self._transition(ep, changed)
        if result.outcome == DeliveryOutcome.DELIVERED:
            self.observer.count(channel.name, "delivered")
            self.observer.latency(channel.name, max(self.clock() - entry.first_ms / 1000, 0.0))
            self._decided(job)
            return
        if result.retry_after_s is not None:
            until = self._now_ms() + int(result.retry_after_s * 1000)
            self._pauses[(entry.la, channel.name)] = until
            await self.outbox.pause(entry.la, channel.name, until)
        now_ms = self._now_ms()
        plan = decide(self.policy, entry, channel.name, result, now_ms, self.rnd())
        if plan.retry is not None:
            self.observer.count(channel.name, "retried")
        log.info(
            "relay.attempt_failed",
            extra={
                "channel": channel.name,
                "la": entry.la,
                "outcome": result.outcome,
                "status": result.status,
                "attempt": entry.attempt + 1,
                "detail": result.detail,
                "retry_in_ms": plan.due_ms - now_ms if plan.retry is not None else None,  # the schedule, as decided
            },
        )
        self._decided(job, retry=(plan.retry, plan.due_ms) if plan.retry is not None else None, dead=plan.dead)

    def _decided(
        self,
        job: _Job,
        *,
        retry: tuple[QueueEntry, int] | None = None,
        dead: DeadLetter | None = None,
        hold: QueueEntry | None = None,
    ) -> None:
        """One channel of the job is decided (delivered when nothing is given); the last one settles the entry."""
        if retry is not None:
            job.retries.append(retry)
        if dead is not None:
            job.dead.append(dead)
        if hold is not None:
            job.holds.append(hold)
        job.open -= 1
        if job.open == 0:
            self._settle_later(job)

    def _settle_later(self, job: _Job) -> None:
        task = asyncio.create_task(self._settle(job))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, job: _Job) -> None:
        entry = job.entry
        for dead in job.dead:
            self.observer.count(dead.channel, "dead")
            log.warning(
                "relay.dead_letter",
                extra={
                    "channel": dead.channel,
                    "la": entry.la,
                    "reason": dead.reason,
                    "status": dead.status,
                    "detail": dead.detail,
                },
            )
        try:
            await self.outbox.settle(
                entry, notification_id=job.nid, retries=job.retries, dead=job.dead, holds=job.holds
            )
        except Exception:
            log.exception("relay.settle_failed")  # still pending in the group: reclaimed and handled again
        finally:
            self._mine.discard(entry.id)


# -- operations -----------------------------------------------------------------------------------------------------
class DeliveryAdmin:
    """The ops view of deliveries (docs/contract.md §8): per-channel counts and re-queueing a dead letter."""

    def __init__(
        self,
        ledger: DeliveryLedger,
        audit: AuditLog,
        channels_of: Mapping[str, Sequence[str]],
        clock: EpochClock = epoch_s,
    ) -> None:
        self.ledger = ledger
        self.audit = audit
        self.channels_of = channels_of
        self.clock = clock

    async def stats(self) -> dict[str, ChannelStats]:
        return await self.ledger.stats(self.channels_of, int(self.clock() * 1000))

    async def deliveries(self, ctx: AuditContext) -> dict[str, Any]:
        stats = await self.stats()
        await self.audit.append(None, ctx.entry("admin.deliveries.read", None, self._now()))
        return {"channels": {name: s.to_api() for name, s in stats.items()}}

    async def retry_dead_letter(self, ctx: AuditContext, dead_id: str) -> None:
        ok = is_entry_id(dead_id) and await self.ledger.requeue_dead(dead_id, int(self.clock() * 1000))
        await self.audit.append(
            None, ctx.entry("admin.dead-letter.retry", None, self._now(), deadLetter=dead_id, found=ok)
        )
        if not ok:
            raise NotFound("no such dead letter")

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)
