"""Flag sync use-cases: the relay (queue -> FHIR server, newest state only, retries, dead letters), the
scheduler that queues records whose visibility window has ended (time-driven status, no upload needed), the start-up
check of the server's CapabilityStatement and the sampling of the queue's backlog."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from cpis_bridge.core.backoff import Backoff
from cpis_bridge.core.clock import Clock, epoch_day, epoch_ms, today_london, utc_now
from cpis_bridge.core.errors import StoreUnavailable
from cpis_bridge.core.ports import FlagServer, FlagStatus, FlagWrite, SyncItem, SyncQueue, WriteOutcome, WriteResult
from cpis_bridge.core.records import Record, VisibilityWindows

log = logging.getLogger("cpis_bridge.sync")

ACTIVE, INACTIVE, ENTERED_IN_ERROR = FlagStatus.ACTIVE, FlagStatus.INACTIVE, FlagStatus.ENTERED_IN_ERROR
LOCK_TTL_MS = 60_000  # one conditional write per identifier at a time
BUSY_RETRY_MS = 500

Observer = Callable[[str, int], None]


def desired(record: Record | None, item: SyncItem, day: dt.date, windows: VisibilityWindows) -> FlagWrite | None:
    """The Flag write a record calls for now: its current state, or its tombstone when erased; None if unknown."""
    if record is not None:
        return FlagWrite(record, ACTIVE if record.is_visible(day, windows) else INACTIVE)
    if item.tombstone is not None:
        return FlagWrite(item.tombstone, ENTERED_IN_ERROR)
    return None


#: Answers about the server as a whole (unreachable, throttled, unavailable): they pause every request to it.
#: Every other failure is the record's own and backs off that record alone.
SERVER_WIDE = frozenset({0, 429, 503})
#: A version conflict (412 on one Flag, not several matching) is retried this many times in all, then dead-lettered.
MAX_VERSION_CONFLICTS = 5
#: While the server is unreachable it is probed (GET metadata) at least this often, so sync resumes within about
#: this long of its return, however long the outage was.
PROBE_MAX_S = 0.5


class FlagSyncRelay:
    """Reads the sync queue as one consumer of the "relays" group and mirrors each record's newest state."""

    def __init__(
        self,
        queue: SyncQueue,
        server: FlagServer,
        *,
        windows: VisibilityWindows,
        consumer: str,
        first_retry_s: float = 1.0,
        max_backoff_s: float = 60.0,
        batch: int = 500,
        block_ms: int = 1000,
        conflict_retries: int = 3,
        clock: Clock = utc_now,
        observe: Observer | None = None,
        observe_latency: Callable[[float], None] | None = None,
    ) -> None:
        self.queue = queue
        self.server = server
        self.windows = windows
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.conflict_retries = conflict_retries
        self.clock = clock
        self.observe = observe or (lambda outcome, n: None)
        self.observe_latency = observe_latency or (lambda seconds: None)
        self.backoff = Backoff(first_retry_s, max_backoff_s)  # per record, by its attempts
        self.server_backoff = Backoff(first_retry_s, max_backoff_s)  # 429/503 with no timing: the whole server
        self.probe_backoff = Backoff(first_retry_s, min(max_backoff_s, PROBE_MAX_S))

    async def run_once(self) -> int:
        """Move due retries back, read one batch, send it. Returns how many records were handled."""
        now = epoch_ms(self.clock())
        paused = await self.queue.paused_until() - now  # a Retry-After seen by any process pauses every process
        if paused > 0:
            self.server.pause(paused / 1000)
            await asyncio.sleep(min(paused, self.block_ms) / 1000)
            return 0
        if not self.server.reachable and not await self._probe():
            return 0
        await self.queue.move_due(now)
        items = await self.queue.read(self.consumer, self.batch, self.block_ms)
        await self.send(items)
        return len(items)

    async def _probe(self) -> bool:
        """The server was unreachable: wait out the gate, then ask it for its CapabilityStatement."""
        wait = self.server.paused_for()
        if wait > 0:
            await asyncio.sleep(min(wait, self.block_ms / 1000))
            return False
        if await self.server.probe():
            self.probe_backoff.reset()
            log.info("sync.server.reachable")
            return True
        self.server.pause(self.probe_backoff.next())
        return False

    async def send(self, items: Sequence[SyncItem]) -> None:
        """Send a read batch; with conditional writes, only the identifiers this relay could lock."""
        if not items:
            return
        if not self.server.serialised:
            await self.process(items)
            return
        owned = await self.queue.lock(items, self.consumer, LOCK_TTL_MS)
        mine = [i for i, ok in zip(items, owned, strict=True) if ok]
        busy = [i for i, ok in zip(items, owned, strict=True) if not ok]
        try:
            await self.process(mine)
        finally:
            await self.queue.unlock(mine)
        if busy:  # another process is writing these identifiers: look again shortly, with the newest state
            await self.queue.defer(busy, epoch_ms(self.clock()) + BUSY_RETRY_MS)

    async def process(self, items: Sequence[SyncItem]) -> None:
        day = today_london(self.clock())
        pending = list(items)
        later: list[tuple[SyncItem, WriteResult]] = []
        delivered = 0
        for attempt in range(self.conflict_retries + 1):
            if not pending:
                break
            records = await self.queue.current(pending)  # re-read: only the newest version is ever sent
            sendable: list[tuple[SyncItem, FlagWrite]] = []
            unknown: list[SyncItem] = []
            for item, record in zip(pending, records, strict=True):
                write = desired(record, item, day, self.windows)
                if write is None:
                    unknown.append(item)  # erased before we ever saw its tombstone: nothing to send
                else:
                    sendable.append((item, write))
            await self.queue.done(unknown)
            results = await self.server.write([w for _, w in sendable])
            conflicts: list[tuple[SyncItem, WriteResult]] = []
            ok: list[SyncItem] = []
            for (item, _), result in zip(sendable, results, strict=True):
                if result.outcome == WriteOutcome.OK:
                    ok.append(item)
                elif result.outcome == WriteOutcome.CONFLICT:
                    conflicts.append((item, result))
                elif result.outcome == WriteOutcome.DEAD:
                    await self._dead(item, result)
                else:
                    later.append((item, result))
            await self.queue.done(ok)
            delivered += len(ok)
            now_ms = epoch_ms(self.clock())
            for item in ok:
                self.observe_latency(max(0.0, (now_ms - item.queued_ms) / 1000))
            pending = [item for item, _ in conflicts]
            if conflicts and attempt < self.conflict_retries:
                await asyncio.sleep(0.05 * (attempt + 1))
            else:
                later.extend(conflicts)  # conflicts that kept conflicting back off like other failures of one record
        if delivered:
            self.observe("delivered", delivered)
            self.server_backoff.reset()
        if later:
            await self._later(later)

    async def _dead(self, item: SyncItem, result: WriteResult) -> None:
        log.warning("sync.dead", extra={"la": item.la, "status": result.status, "reason": result.reason})
        await self.queue.dead(item, result)
        self.observe("dead", 1)

    async def _later(self, failed: Sequence[tuple[SyncItem, WriteResult]]) -> None:
        """Park what failed: a server-wide failure pauses the server (every process, when it said how long) and its
        records wait for it without counting an attempt; any other failure backs off that record alone."""
        now = epoch_ms(self.clock())
        server_wait: float | None = None
        told: float | None = None
        items: list[SyncItem] = []
        dues: list[int] = []
        for item, result in failed:
            if result.status == 412 and item.attempts + 1 >= MAX_VERSION_CONFLICTS:
                await self._dead(
                    item, WriteResult(WriteOutcome.DEAD, 412, "version-conflict", result.operation_outcome)
                )
                continue
            if result.status in SERVER_WIDE:
                if result.retry_after_s is not None:
                    told = max(told or 0.0, result.retry_after_s)
                    wait = result.retry_after_s
                elif result.status == 0 and not self.server.reachable:
                    wait = 0.0  # unreachable: the relay probes it and reads these as soon as it answers
                else:
                    server_wait = server_wait if server_wait is not None else self.server_backoff.next()
                    wait = server_wait
                items.append(item)
            else:
                wait = self.backoff.delay(item.attempts + 1)
                items.append(replace(item, attempts=item.attempts + 1))
            dues.append(now + int(wait * 1000))
        if told is not None:
            await self.queue.pause_until(now + int(told * 1000), now)
        if server_wait is not None:
            self.server.pause(server_wait)
        if items:
            await self.queue.defer(items, dues)
            self.observe("retried", len(items))
            log.info("sync.deferred", extra={"count": len(items), "maxDelayS": round((max(dues) - now) / 1000, 3)})

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: relay batches; errors (Redis down, bugs) are logged and retried with backoff."""
        errors = Backoff(0.2, 10.0)
        while not stop.is_set():
            try:
                await self.run_once()
                errors.reset()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sync.relay.error")
                try:
                    await asyncio.wait_for(stop.wait(), timeout=errors.next())
                except TimeoutError:
                    pass


class FlagScheduler:
    """Queues the records whose visibility window has ended, so their Flags turn inactive without an upload."""

    def __init__(self, queue: SyncQueue, *, clock: Clock = utc_now, interval_s: float = 60.0) -> None:
        self.queue = queue
        self.clock = clock
        self.interval_s = interval_s

    async def run_once(self) -> int:
        today = today_london(self.clock())
        moved = 0
        while True:  # bounded by the schedule's size: each call removes what it moves
            n = await self.queue.schedule_due(epoch_day(today))
            moved += n
            if n == 0:
                break
        if moved:
            log.info("sync.schedule.due", extra={"count": moved})
        return moved

    async def run(self, stop: asyncio.Event) -> None:
        errors = Backoff(0.5, 30.0)
        while not stop.is_set():
            try:
                await self.run_once()
                wait = self.interval_s
                errors.reset()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sync.scheduler.error")
                wait = errors.next()
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                pass


async def check_capabilities(
    prepare: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    transient: tuple[type[Exception], ...],
    attempts: int = 20,
) -> None:
    """Start-up check of the server's CapabilityStatement (``prepare``, the adapter's); retried in the background on
    the ``transient`` errors, backing off to a minute, never blocking start."""
    backoff = Backoff(1.0, 60.0, jitter=False)
    for _ in range(attempts):
        delay = backoff.next()
        try:
            await prepare()
            return
        except transient as exc:
            log.warning("fhir.capabilities.unavailable", extra={"error": str(exc), "retryInS": delay})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return


async def sample_backlog(
    stats: Callable[[int], Awaitable[tuple[int, float]]],
    report: Callable[[int, float], None],
    stop: asyncio.Event,
    *,
    interval_s: float = 5.0,
    clock: Clock = utc_now,
) -> None:
    """Every ``interval_s``: the queue's backlog (entries waiting, age of the oldest) to ``report``; a store that
    cannot be reached skips a sample."""
    while not stop.is_set():
        with contextlib.suppress(StoreUnavailable):
            report(*await stats(epoch_ms(clock())))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
