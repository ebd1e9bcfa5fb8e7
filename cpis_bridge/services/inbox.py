"""The LA side of notifications (API.md section 4): the pull inbox page by page, acknowledgements, and a child's
last 25 accesses for an LA holding a record on that number. Every read is audited."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from cpis_bridge.core.access import HISTORY_LENGTH, UNREADABLE, Unreadable, ignore_unreadable
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.errors import NotFound, UnreadableInput
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import AccessStore, AuditLog, Inbox
from cpis_bridge.services.delivery import render

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_ENTRY_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
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
    if version != "n1" or not _ENTRY_ID.match(entry_id):
        raise UnreadableInput("after is not a valid cursor")
    return entry_id


class InboxService:
    def __init__(
        self,
        inbox: Inbox,
        accesses: AccessStore,
        audit: AuditLog,
        *,
        care_settings: Callable[[], dict[str, tuple[str, str]]],
        clock: Callable[[], dt.datetime] | None = None,
        unreadable: Unreadable = ignore_unreadable,
    ) -> None:
        self.inbox = inbox
        self.unreadable = unreadable
        self.accesses = accesses
        self.audit = audit
        self.care_settings = care_settings
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))

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
        await self.audit.append(None, ctx.entry("notifications.read", None, self.clock(), count=len(items),
                                                ids=[i["id"] for i in items]))
        return {"notifications": items, "next": encode_cursor(last)}

    async def acknowledge(self, ctx: AuditContext, la: str, notification_id: str) -> None:
        ref = await self.inbox.find(la, notification_id) if _uuid_like(notification_id) else None
        await self.audit.append(None, ctx.entry("notifications.ack", None, self.clock(), notification=notification_id,
                                                found=ref is not None))
        if ref is None:
            raise NotFound("no such notification")
        await self.inbox.ack(la, ref)

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
