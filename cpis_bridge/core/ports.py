"""Protocols for the adapters the use-cases need (implemented in store/, wired in app.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cpis_bridge.core.access import Access
from cpis_bridge.core.records import Record, VisibilityWindows


@dataclass(frozen=True, slots=True)
class Change:
    """One record write for :meth:`RecordStore.apply`: the record, when its visibility ends, its audit entry."""

    record: Record
    invisible_from_day: int | None  # epoch day; None while the record has no end
    audit: Mapping[str, Any]


class RecordStore(Protocol):
    async def get(self, la: str, local_id: str) -> Record | None: ...

    async def for_number(self, la: str, nhs: str) -> list[Record]: ...

    async def index(self, la: str) -> dict[str, str]: ...

    async def apply(self, la: str, changes: Sequence[Change]) -> list[tuple[str, int]]: ...

    async def erase(self, la: str, local_id: str, audit: Mapping[str, Any]) -> bool: ...

    async def upload_report(self, la: str, sequence: int) -> bytes | None: ...

    async def last_sequence(self, la: str) -> int | None: ...

    async def save_upload(self, la: str, sequence: int, report: bytes) -> None: ...

    async def lock_uploads(self, la: str, token: str, ttl_s: int) -> bool: ...

    async def unlock_uploads(self, la: str, token: str) -> None: ...


class AuditLog(Protocol):
    async def append(self, nhs: str | None, entry: Mapping[str, Any]) -> None: ...

    async def query(self, nhs: str, limit: int = 1000) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class LookupOutcome:
    """What the access step found and did. ``status``: 0 nothing recorded, 1 recorded, 2 repeat of a recorded one."""

    records: list[Record]
    status: int
    access: Access | None
    access_id: str | None


class AccessStore(Protocol):
    async def lookup(
        self,
        nhs: str,
        *,
        today_day: int,
        windows: VisibilityWindows,
        record_access: Access | None,
        audit_with: Mapping[str, Any],
        audit_without: Mapping[str, Any],
        encounter: Mapping[str, Any] | None = None,
    ) -> LookupOutcome: ...

    async def history(self, nhs: str) -> tuple[list[Record], list[tuple[str, Access]]]: ...

    async def encounter(self, encounter_id: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class InboxItem:
    """One inbox notification mentioning a child, as held (for the subject-access export)."""

    la: str
    entry_id: str
    acknowledged: bool
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class SubjectData:
    """Everything held for one NHS number, as stored (the service shapes it for output)."""

    tag: str
    records: list[Record]
    accesses: list[tuple[str, Access]]
    encounters: dict[str, dict[str, Any]]
    inbox: list[InboxItem]
    audit: list[dict[str, Any]]
    system_audit: list[dict[str, Any]]


class RetentionStore(Protocol):
    """Retention (purge) and subject access over the whole key space: SCAN-based and batched."""

    def child_records(self, batch: int = 500) -> AsyncIterator[list[Record]]: ...

    async def delete_records(self, records: Sequence[Record], audit: Mapping[str, Any]) -> int: ...

    async def trim_accesses(self, before_ms: int) -> int: ...

    async def trim_acknowledged_inbox(self, before_ms: int) -> int: ...

    async def trim_audit(self, before: str) -> int: ...

    async def subject(self, nhs: str) -> SubjectData: ...

    async def audit_system(self, entry: Mapping[str, Any]) -> None: ...
