"""Protocols for the adapters the use-cases need (implemented in store/, wired in app.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cpis_bridge.core.records import Record


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
