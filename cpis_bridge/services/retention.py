"""Retention and subject access use-cases: purge what is past the retention settings; export everything held for
an NHS number. Both are audited in the system audit list."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cpis_bridge.core.access import SEP, UNREADABLE, Access, Unreadable, ignore_unreadable, instant
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import DAY_MS, epoch_ms, today_london, utc_now
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import RetentionStore
from cpis_bridge.core.records import Record, VisibilityWindows


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long things are kept (days); docs/contract.md §1, CPIS_RETENTION_*."""

    record_days: int = 90
    access_days: int = 730
    inbox_days: int = 90
    audit_days: int = 2922


def record_expired(record: Record, today: dt.date, windows: VisibilityWindows, keep_days: int) -> bool:
    """True when the record's visibility ended more than ``keep_days`` days before ``today``."""
    last = record.last_visible_day(windows)
    return last is not None and (today - last).days > keep_days


class RetentionService:
    def __init__(
        self,
        store: RetentionStore,
        *,
        policy: RetentionPolicy,
        windows: VisibilityWindows,
        unreadable: Unreadable = ignore_unreadable,
    ) -> None:
        self.store = store
        self.unreadable = unreadable
        self.policy = policy
        self.windows = windows

    async def purge(self, ctx: AuditContext, now: dt.datetime | None = None) -> dict[str, int]:
        """Delete what is past retention; returns counts per kind. The run itself is audited (system list)."""
        now = now or utc_now()
        today = today_london(now)
        now_ms = epoch_ms(now)
        p = self.policy
        template = ctx.entry("record.purged", None, now)
        records = 0
        async for batch in self.store.child_records():
            expired = [r for r in batch if record_expired(r, today, self.windows, p.record_days)]
            records += await self.store.delete_records(expired, template)
        counts = {
            "records": records,
            "accesses": await self.store.trim_accesses(now_ms - p.access_days * DAY_MS),
            "inboxEntries": await self.store.trim_acknowledged_inbox(now_ms - p.inbox_days * DAY_MS),
        }
        audit_cutoff = instant(now - dt.timedelta(days=p.audit_days))
        assert audit_cutoff is not None
        counts["auditEntries"] = await self.store.trim_audit(audit_cutoff)
        await self.store.audit_system(
            ctx.entry(
                "retention.purge",
                None,
                now,
                removed=counts,
                policy={
                    "recordDays": p.record_days,
                    "accessDays": p.access_days,
                    "inboxDays": p.inbox_days,
                    "auditDays": p.audit_days,
                },
            )
        )
        return counts

    async def export(self, ctx: AuditContext, nhs: NhsNumber, now: dt.datetime | None = None) -> dict[str, Any]:
        """Everything held for one NHS number (subject access), as JSON-ready data. The export is audited."""
        now = now or utc_now()
        today = today_london(now)
        data = await self.store.subject(nhs)
        by_la: dict[str, list[dict[str, Any]]] = {}
        for rec in data.records:
            by_la.setdefault(rec.la, []).append(rec.to_api(visible=rec.is_visible(today, self.windows)))
        accesses = [
            {
                **access.to_api(data.tag, {}),
                "careSetting": {"ods": access.care_setting},
                "encounter": data.encounters.get(aid),
            }
            for aid, access in data.accesses
        ]
        inbox = []
        for item in data.inbox:
            try:
                inbox.append(
                    {
                        "la": item.la,
                        "entryId": item.entry_id,
                        "acknowledged": item.acknowledged,
                        "queuedAt": _ms_instant(item.fields.get("at")),
                        "access": _decoded_access(item.fields.get("acc"), data.tag),
                        "records": _json_or_none(item.fields.get("recs")),
                    }
                )
            except UNREADABLE:  # one stored entry no current writer produces must not stop the export
                self.unreadable("notification")
        result: dict[str, Any] = {
            "nhsNumber": str(nhs),
            "exportedAt": instant(now),
            "records": by_la,
            "accesses": accesses,
            "inboxNotifications": inbox,
            "audit": data.audit,
            "systemAudit": data.system_audit,
        }
        await self.store.audit_system(
            ctx.entry(
                "subject-access.export",
                None,
                now,
                subjectTag=data.tag,
                counts={
                    "records": len(data.records),
                    "accesses": len(accesses),
                    "inboxNotifications": len(inbox),
                    "audit": len(data.audit) + len(data.system_audit),
                },
            )
        )
        return result


def _ms_instant(value: str | None) -> str | None:
    if not value or not value.isdigit():
        return None
    return instant(dt.datetime.fromtimestamp(int(value) / 1000, dt.UTC))


def _decoded_access(value: str | None, tag: str) -> dict[str, Any] | None:
    if not value or value.count(SEP) != 6:
        return None
    access = Access.decode(value)
    return {**access.to_api(tag, {}), "careSetting": {"ods": access.care_setting}}


def _json_or_none(value: str | None) -> Any:
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None
