"""Protocols for the adapters the use-cases need (implemented in store/, wired in app.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


# -- Flag sync (services/sync.py; adapters store/sync.py and fhir/flag_sync.py) ---------------------------------


@dataclass(frozen=True, slots=True)
class SyncItem:
    """One record to mirror, coalesced from every queue entry read for it in one batch."""

    la: str
    local_id: str
    entry_ids: tuple[str, ...]
    queued_ms: int  # when the oldest of those entries was first queued
    tombstone: Record | None = None  # the erased record, when an entry carried one


@dataclass(frozen=True, slots=True)
class FlagWrite:
    """Write the record's Flag with this status (active, inactive or entered-in-error)."""

    record: Record
    status: str


@dataclass(frozen=True, slots=True)
class WriteResult:
    """How one Flag write ended: ok, retry (transient), conflict (409/version 412: re-read and resend), dead."""

    outcome: str
    status: int = 0
    reason: str = ""
    operation_outcome: str | None = None  # the server's OperationOutcome, JSON
    retry_after_s: float | None = None


class SyncQueue(Protocol):
    async def read(self, consumer: str, count: int, block_ms: int) -> list[SyncItem]: ...

    async def current(self, items: Sequence[SyncItem]) -> list[Record | None]: ...

    async def done(self, items: Sequence[SyncItem]) -> None: ...

    async def defer(self, items: Sequence[SyncItem], due_ms: int) -> None: ...

    async def dead(self, item: SyncItem, result: WriteResult) -> None: ...

    async def move_due(self, now_ms: int) -> int: ...

    async def schedule_due(self, today_day: int) -> int: ...

    async def paused_until(self) -> int: ...

    async def pause_until(self, until_ms: int, now_ms: int) -> None: ...

    async def lock(self, items: Sequence[SyncItem], owner: str, ttl_ms: int) -> list[bool]: ...

    async def unlock(self, items: Sequence[SyncItem]) -> None: ...


class FlagServer(Protocol):
    async def prepare(self) -> None: ...

    async def write(self, writes: Sequence[FlagWrite]) -> list[WriteResult]: ...

    def pause(self, seconds: float) -> None: ...

    @property
    def serialised(self) -> bool: ...
