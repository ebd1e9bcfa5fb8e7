"""The LA side of notifications (docs/contract.md §4): the pull inbox page by page, acknowledgements, and a child's
last 25 accesses for an LA holding a record on that number. Every read is audited."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cpis_bridge.core.access import HISTORY_LENGTH, SEP, UNREADABLE, Unreadable, ignore_unreadable
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import Clock, epoch_ms, london_midnight_ms, utc_now
from cpis_bridge.core.errors import NotFound, UnreadableInput
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import AccessStore, AuditLog, Inbox
from cpis_bridge.services.delivery import is_entry_id, render

log = logging.getLogger("cpis_bridge.inbox")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_CURSOR_START = "0-0"


def encode_cursor(entry_id: str) -> str:
    return base64.urlsafe_b64encode(f"n1:{entry_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The inbox entry id behind an opaque cursor; 400 when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError):
        raise UnreadableInput("after is not a valid cursor") from None
    version, _, entry_id = raw.partition(":")
    if version != "n1" or not is_entry_id(entry_id):
        raise UnreadableInput("after is not a valid cursor")
    return entry_id


SCAN_BUDGET = 2000  # entries one filtered page reads at most before it offers the next page


@dataclass(frozen=True, slots=True)
class InboxFilter:
    """What a person browsing the inbox asked for. Days are Europe/London calendar days, both ends included."""

    since: dt.date | None = None
    until: dt.date | None = None
    care_setting: str | None = None
    acknowledged: bool | None = None

    @property
    def scans(self) -> bool:
        """True when entries in the date range may be skipped (so a page can take more than one read)."""
        return self.care_setting is not None or self.acknowledged is not None


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def readable_body(la: str, fields: dict[str, str], unreadable: Unreadable) -> dict[str, Any] | None:
    """The notification body of an inbox entry, or None (reported) for one no current writer produces."""
    try:
        return render(la, fields).body
    except UNREADABLE:
        unreadable("notification")
        return None


class InboxService:
    def __init__(
        self,
        inbox: Inbox,
        accesses: AccessStore,
        audit: AuditLog,
        *,
        care_settings: Callable[[], dict[str, tuple[str, str]]],
        clock: Clock = utc_now,
        unreadable: Unreadable = ignore_unreadable,
    ) -> None:
        self.inbox = inbox
        self.unreadable = unreadable
        self.accesses = accesses
        self.audit = audit
        self.care_settings = care_settings
        self.clock = clock

    async def notifications(self, ctx: AuditContext, la: str, after: str | None, limit: int) -> dict[str, Any]:
        start = decode_cursor(after) if after else None
        rows = await self.inbox.page(la, start, min(max(limit, 1), MAX_LIMIT))
        items = []
        for _, fields, acked in rows:
            try:
                body = render(la, fields).body
            except UNREADABLE:  # a stored entry no current writer produces: skipped, and the page goes past it
                self.unreadable("notification")
                continue
            body["acknowledged"] = acked
            items.append(body)
        last = rows[-1][0] if rows else (start or _CURSOR_START)
        await self.audit.append(
            None, ctx.entry("notifications.read", None, self.clock(), count=len(items), ids=[i["id"] for i in items])
        )
        return {"notifications": items, "next": encode_cursor(last)}

    async def browse(
        self, ctx: AuditContext, la: str, flt: InboxFilter, before: str | None, size: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of notifications, newest first, matching ``flt``, older than the cursor ``before``; with the
        cursor of the next page (None on the last). Items carry no recent accesses. Audited like the pull inbox."""
        start = decode_cursor(before) if before else None
        if flt.until is not None:
            end = f"{london_midnight_ms(flt.until + dt.timedelta(days=1))}-0"
            if start is None or _entry_key(end) < _entry_key(start):
                start = end
        oldest = f"{london_midnight_ms(flt.since)}-0" if flt.since is not None else None
        items: list[dict[str, Any]] = []
        more = False
        if flt.scans:  # filtered inside Redis: only matching entries come back, at most SCAN_BUDGET read a page
            budget = SCAN_BUDGET
            while True:
                rows, last, read = await self.inbox.matching(
                    la, start, oldest, size - len(items) + 1, budget, flt.care_setting, flt.acknowledged
                )
                budget -= read
                more = self._take(la, rows, items, size)
                if more:
                    start = items[-1]["_entry"]
                    break
                if last is None:
                    break
                start = last
                if budget <= 0:
                    more = True
                    break
        else:
            while True:
                want = size + 1 - len(items)
                page = await self.inbox.newest(la, start, oldest, want)
                more = self._take(la, page, items, size)
                if more:
                    start = items[-1]["_entry"]
                    break
                if len(page) < want:
                    break
                start = page[-1][0]
        for item in items:
            del item["_entry"]
        await self.audit.append(
            None, ctx.entry("notifications.read", None, self.clock(), count=len(items), ids=[i["id"] for i in items])
        )
        return items, encode_cursor(start) if more and start else None

    def _take(
        self, la: str, rows: list[tuple[str, dict[str, str], bool]], items: list[dict[str, Any]], size: int
    ) -> bool:
        """Render ``rows`` onto ``items`` (each with its entry id as ``_entry``) until it holds ``size``; True when a
        row was left over (there is a next page)."""
        for eid, fields, acked in rows:
            if len(items) == size:
                return True
            body = readable_body(la, fields, self.unreadable)
            if body is None:
                continue
            body["acknowledged"] = acked
            body["_entry"] = eid
            items.append(body)
        return False

    async def notification(self, ctx: AuditContext, la: str, notification_id: str) -> dict[str, Any]:
        """One notification of this LA with its recent accesses and who acknowledged it when; NotFound for any
        other id (another LA's looks absent). Audited on the child's trail."""
        ref = await self.inbox.find(la, notification_id) if _uuid_like(notification_id) else None
        found = await self.inbox.entry(la, ref) if ref is not None else None
        if found is None:
            await self.audit.append(
                None, ctx.entry("notification.read", None, self.clock(), notification=notification_id, found=False)
            )
            raise NotFound("no such notification")
        fields, by = found
        try:
            rendered = render(la, fields)
        except UNREADABLE:
            self.unreadable("notification")
            raise NotFound("no such notification") from None
        body = rendered.body
        body["acknowledged"] = by is not None
        if by:
            at, _, rest = by.partition(SEP)
            subject, _, name = rest.partition(SEP)
            body["acknowledgedBy"] = {
                "at": dt.datetime.fromtimestamp(int(at) / 1000, dt.UTC),
                "id": subject,
                "name": name or None,
            }
        nhs = rendered.nhs
        await self.audit.append(nhs, ctx.entry("notification.read", nhs, self.clock(), notification=notification_id))
        return body

    async def acknowledge(self, ctx: AuditContext, la: str, notification_id: str) -> None:
        ref = await self.inbox.find(la, notification_id) if _uuid_like(notification_id) else None
        now = self.clock()
        await self.audit.append(
            None, ctx.entry("notifications.ack", None, now, notification=notification_id, found=ref is not None)
        )
        if ref is None:
            raise NotFound("no such notification")
        p = ctx.principal
        by = SEP.join((str(epoch_ms(now)), p.subject.replace(SEP, " "), (p.name or "").replace(SEP, " ")))
        await self.inbox.ack(la, ref, by)

    async def child_accesses(self, ctx: AuditContext, la: str, nhs: NhsNumber) -> list[dict[str, Any]]:
        """The last 25 accesses, newest first, when this LA holds a record (visible or not) on the number."""
        records, accesses = await self.accesses.history(nhs)
        held = any(r.la == la for r in records)
        now = self.clock()
        if not held:
            await self.audit.append(nhs, ctx.entry("accesses.read", None, now, found=False))
            raise NotFound("no such child")
        names = self.care_settings()
        out = []
        for access_id, access in accesses[:HISTORY_LENGTH]:
            item = access.to_api("", names)
            item["id"] = access_id
            out.append(item)
        await self.audit.append(nhs, ctx.entry("accesses.read", nhs, now, count=len(out)))
        return out


def _uuid_like(value: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", value) is not None


class InboxFeed:
    """New notifications pushed to the people watching their LA's inbox (the web view's live updates). One tail of
    every LA's inbox per process, however many watch, and none while nobody does; each watcher has a bounded queue,
    and one that falls behind loses updates rather than holding memory (its page still lists everything on
    reload)."""

    QUEUE = 100

    def __init__(
        self, inbox: Inbox, las: list[str], *, block_ms: int = 5000, unreadable: Unreadable = ignore_unreadable
    ) -> None:
        self.inbox = inbox
        self.las = las
        self.block_ms = block_ms
        self.unreadable = unreadable
        self.watchers: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = defaultdict(set)
        self.started = asyncio.Event()  # set once the tail reads (someone watches)
        self._wanted = asyncio.Event()

    def watch(self, la: str) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.QUEUE)
        self.watchers[la].add(queue)
        self._wanted.set()
        return queue

    def unwatch(self, la: str, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.watchers[la].discard(queue)
        if not any(self.watchers.values()):
            self._wanted.clear()

    def close(self) -> None:
        """Every watcher gets None: its stream ends (on shutdown)."""
        for queues in self.watchers.values():
            for queue in queues:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)

    async def run(self, stop: asyncio.Event) -> None:
        after: dict[str, str] | None = None
        while not stop.is_set():
            if not self._wanted.is_set():
                after = None  # nobody watches: no reads; the tail starts afresh with the next watcher
                self.started.clear()
                await self._wanted.wait()
                continue
            try:
                if after is None:
                    after = await self.inbox.heads(self.las)
                    self.started.set()
                rows = await self.inbox.tail(after, self.block_ms)
            except Exception:  # the store is away: try again shortly, never end the feed
                log.warning("inbox_feed.read_failed", exc_info=True)
                with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow a cancel
                    async with asyncio.timeout(1.0):
                        await stop.wait()
                continue
            for la, eid, fields in rows:
                after[la] = eid
                queues = self.watchers.get(la)
                if not queues:
                    continue
                body = readable_body(la, fields, self.unreadable)
                if body is None:
                    continue
                for queue in queues:
                    with contextlib.suppress(asyncio.QueueFull):
                        queue.put_nowait(body)
