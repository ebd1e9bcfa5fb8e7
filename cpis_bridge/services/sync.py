"""Flag sync use-cases: the relay (queue -> FHIR server, newest state only, retries, dead letters) and the
scheduler that queues records whose visibility window has ended (time-driven status, no upload needed)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Callable, Sequence

from cpis_bridge.core.ports import FlagServer, FlagWrite, SyncItem, SyncQueue
from cpis_bridge.core.records import Record, VisibilityWindows, today_london

log = logging.getLogger("cpis_bridge.sync")

ACTIVE, INACTIVE, ENTERED_IN_ERROR = "active", "inactive", "entered-in-error"
EPOCH = dt.date(1970, 1, 1)

Clock = Callable[[], dt.datetime]
Observer = Callable[[str, int], None]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def epoch_ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def desired(record: Record | None, item: SyncItem, day: dt.date, windows: VisibilityWindows) -> FlagWrite | None:
    """The Flag write a record calls for now: its current state, or its tombstone when erased; None if unknown."""
    if record is not None:
        return FlagWrite(record, ACTIVE if record.is_visible(day, windows) else INACTIVE)
    if item.tombstone is not None:
        return FlagWrite(item.tombstone, ENTERED_IN_ERROR)
    return None


class Backoff:
    """Exponential backoff with full jitter between ``first_s`` and ``max_s``; reset after a success."""

    def __init__(self, first_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.max_s, self.first_s * float(2 ** min(self.failures, 30)))
        self.failures += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


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
        self.backoff = Backoff(first_retry_s, max_backoff_s)

    async def run_once(self) -> int:
        """Move due retries back, read one batch, send it. Returns how many records were handled."""
        await self.queue.move_due(epoch_ms(self.clock()))
        items = await self.queue.read(self.consumer, self.batch, self.block_ms)
        if items:
            await self.process(items)
        return len(items)

    async def process(self, items: Sequence[SyncItem]) -> None:
        day = today_london(self.clock())
        pending = list(items)
        retry: list[SyncItem] = []
        retry_after: float | None = None
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
            conflicts: list[SyncItem] = []
            ok: list[SyncItem] = []
            for (item, _), result in zip(sendable, results, strict=True):
                if result.outcome == "ok":
                    ok.append(item)
                elif result.outcome == "conflict":
                    conflicts.append(item)
                elif result.outcome == "dead":
                    log.warning("sync.dead", extra={"la": item.la, "status": result.status, "reason": result.reason})
                    await self.queue.dead(item, result)
                    self.observe("dead", 1)
                else:
                    retry.append(item)
                    if result.retry_after_s is not None:
                        retry_after = max(retry_after or 0.0, result.retry_after_s)
            await self.queue.done(ok)
            delivered += len(ok)
            pending = conflicts
            if conflicts and attempt < self.conflict_retries:
                await asyncio.sleep(0.05 * (attempt + 1))
        retry.extend(pending)  # conflicts that kept conflicting wait like transient failures
        if delivered:
            self.observe("delivered", delivered)
        if retry:
            delay = retry_after if retry_after is not None else self.backoff.next()
            if retry_after is None:
                self.server.pause(delay)  # the server is struggling: every request waits, not only these
            await self.queue.defer(retry, epoch_ms(self.clock()) + int(delay * 1000))
            self.observe("retried", len(retry))
            log.info("sync.deferred", extra={"count": len(retry), "delayS": round(delay, 3)})
        elif delivered:
            self.backoff.reset()

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
            n = await self.queue.schedule_due((today - EPOCH).days)
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
