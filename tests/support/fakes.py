"""In-memory fakes of the core ports (cpis_bridge/core/ports.py): RecordStore, AuditLog, AccessStore and
UploadStore over one shared ``Memory``, so services get fast unit tests without Redis. They are fakes of the PORTS
(never mocks of our modules): tests/integration/test_port_contracts.py runs the same test bodies against them and
against the Redis adapters, so a fake that drifts from the adapter fails there."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cpis_bridge.core.access import Access
from cpis_bridge.core.clock import EPOCH
from cpis_bridge.core.errors import UploadInterrupted
from cpis_bridge.core.nhs import NhsTagger
from cpis_bridge.core.ports import Change, LookupOutcome, LookupStatus
from cpis_bridge.core.records import Record, VisibilityWindows
from tests.support.world import HASH_KEY

HISTORY = 25  # the newest accesses a look-up sees (access.lua's LRANGE 0 24)
ACCESS_LOG_MAX = 1000


def _stored(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An audit entry as the store gives it back (JSON round trip, as Redis keeps it)."""
    out: dict[str, Any] = orjson.loads(orjson.dumps(dict(entry)))
    return out


def _bare(record: Record) -> Record:
    """The record without its stored metadata (what decides "unchanged")."""
    return dataclasses.replace(record, version=0, updated_at=None)


@dataclass
class Lease:
    token: str
    expires_at: float  # the fake clock's seconds


@dataclass
class Memory:
    """The state the fakes share, as the Redis adapters share one key space. ``clock`` gives the time stored records
    carry; ``monotonic`` (seconds) ages upload leases; a test may advance either. ``notifications`` lists the
    (la, access id) of every notification a recorded access queued."""

    hash_key: bytes = HASH_KEY.encode()
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    now_s: float = 0.0
    ids: dict[str, dict[str, str]] = field(default_factory=dict)  # la -> local id -> NHS number
    children: dict[str, dict[str, Record]] = field(default_factory=dict)  # NHS number -> "la|local id" -> record
    audit: dict[str | None, list[dict[str, Any]]] = field(default_factory=dict)  # NHS number (None: system), newest 1st
    accesses: dict[str, list[str]] = field(default_factory=dict)  # NHS number -> encoded accesses, newest first
    encounters: dict[str, dict[str, Any]] = field(default_factory=dict)
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    notifications: list[tuple[str, str]] = field(default_factory=list)
    leases: dict[str, Lease] = field(default_factory=dict)
    journals: dict[str, bytes] = field(default_factory=dict)
    bodies: dict[str, list[bytes]] = field(default_factory=dict)
    reports: dict[str, dict[int, bytes]] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)

    def tag(self, nhs: str) -> str:
        """The keyed hash of an NHS number, as the store computes it (access ids derive from it)."""
        return NhsTagger(self.hash_key)(nhs)

    def lease_holder(self, la: str) -> str | None:
        lease = self.leases.get(la)
        if lease is None or lease.expires_at <= self.now_s:
            self.leases.pop(la, None)
            return None
        return lease.token

    def child_records(self, nhs: str) -> list[Record]:
        stored = self.children.get(nhs, {})
        return [stored[f] for f in sorted(stored)]


class FakeRecordStore:
    """RecordStore: apply answers C (created), M (modified) or U (unchanged: no version, no audit entry)."""

    def __init__(self, memory: Memory) -> None:
        self.m = memory

    async def get(self, la: str, local_id: str) -> Record | None:
        nhs = self.m.ids.get(la, {}).get(local_id)
        return None if nhs is None else self.m.children.get(nhs, {}).get(f"{la}|{local_id}")

    async def for_number(self, la: str, nhs: str) -> list[Record]:
        return [r for r in self.m.child_records(str(nhs)) if r.la == la]

    async def index(self, la: str) -> dict[str, str]:
        return dict(self.m.ids.get(la, {}))

    async def count(self, la: str) -> int:
        return len(self.m.ids.get(la, {}))

    async def get_many(self, la: str, local_ids: Sequence[str]) -> list[Record | None]:
        return [await self.get(la, lid) for lid in local_ids]

    async def get_indexed(self, la: str, entries: Sequence[tuple[str, str]]) -> list[Record | None]:
        return await self.get_many(la, [lid for lid, _ in entries])

    async def put(self, la: str, change: Change) -> tuple[str, Record]:
        [(code, _)] = await self.apply(la, [change])
        stored = await self.get(la, change.record.local_id)
        assert stored is not None
        return code, stored

    async def apply(self, la: str, changes: Sequence[Change], *, lease: str | None = None) -> list[tuple[str, int]]:
        if lease is not None and self.m.lease_holder(la) != lease:
            raise UploadInterrupted("another process took over this upload", applied=True)
        out: list[tuple[str, int]] = []
        ids = self.m.ids.setdefault(la, {})
        for change in changes:
            rec = change.record
            nhs, key = str(rec.nhs_number), f"{la}|{rec.local_id}"
            current = ids.get(rec.local_id)
            old = None if current is None else self.m.children.get(current, {}).get(key)
            if old is not None and current == nhs and _bare(old) == _bare(rec):
                out.append(("U", old.version))
                continue
            version = 1 if old is None else old.version + 1
            if current is not None and current != nhs:
                self.m.children.get(current, {}).pop(key, None)
            now = self.m.clock().replace(microsecond=self.m.clock().microsecond // 1000 * 1000)
            self.m.children.setdefault(nhs, {})[key] = rec.with_meta(version, now)
            ids[rec.local_id] = nhs
            self.m.audit.setdefault(nhs, []).insert(0, _stored(change.audit))
            out.append(("C" if old is None else "M", version))
        return out

    async def erase(self, la: str, local_id: str, audit: Callable[[str], Mapping[str, Any]]) -> bool:
        nhs = self.m.ids.get(la, {}).pop(local_id, None)
        if nhs is None:
            return False
        self.m.children.get(nhs, {}).pop(f"{la}|{local_id}", None)
        self.m.audit.setdefault(nhs, []).insert(0, _stored(audit(nhs)))
        return True


class FakeAuditLog:
    """AuditLog: per-child lists (and a system list for ``nhs=None``), newest first."""

    def __init__(self, memory: Memory) -> None:
        self.m = memory

    async def append(self, nhs: str | None, entry: Mapping[str, Any]) -> None:
        self.m.audit.setdefault(None if nhs is None else str(nhs), []).insert(0, _stored(entry))

    async def query(self, nhs: str, limit: int = 1000) -> list[dict[str, Any]]:
        return list(self.m.audit.get(str(nhs), [])[:limit])


class FakeAccessStore:
    """AccessStore: the look-up step of access.lua (visibility, idempotent recording on the source event, one
    notification per LA holding a visible record, the audit entry with or without the number)."""

    def __init__(self, memory: Memory) -> None:
        self.m = memory

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
        recent: bool = False,
    ) -> LookupOutcome:
        nhs = str(nhs)
        today = EPOCH + dt.timedelta(days=today_day)
        visible = [r for r in self.m.child_records(nhs) if r.is_visible(today, windows)]
        log = self.m.accesses.setdefault(nhs, [])
        status: LookupStatus = LookupStatus.NOT_RECORDED
        access: Access | None = None
        access_id: str | None = None
        recent_raw: list[str] = []
        if record_access is not None and visible:
            existing = next((a for a in log[:HISTORY] if a.startswith(record_access.idempotency_prefix)), None)
            if existing is not None:
                status, access = LookupStatus.REPEAT, Access.decode(existing)
                access_id = access.access_id(self.m.tag(nhs))
                recent_raw = log[:HISTORY]
            else:
                status, access = LookupStatus.RECORDED, record_access
                access_id = access.access_id(self.m.tag(nhs))
                log.insert(0, record_access.encode())
                del log[ACCESS_LOG_MAX:]
                recent_raw = log[:HISTORY]
                for la in dict.fromkeys(r.la for r in visible):
                    self.m.notifications.append((la, access_id))
                if encounter is not None:
                    self.m.encounters[access_id] = _stored(encounter)
        elif visible:
            recent_raw = log[:HISTORY]
        self.m.audit.setdefault(nhs, []).insert(0, _stored(audit_with if visible else audit_without))
        recent_out = [Access.decode(a) for a in recent_raw] if recent and visible else []
        return LookupOutcome(visible, status, access, access_id, recent_out)

    async def history(self, nhs: str) -> tuple[list[Record], list[tuple[str, Access]]]:
        tag = self.m.tag(str(nhs))
        accesses = [Access.decode(a) for a in self.m.accesses.get(str(nhs), [])[:HISTORY]]
        return self.m.child_records(str(nhs)), [(a.access_id(tag), a) for a in accesses]

    async def encounter(self, encounter_id: str) -> dict[str, Any] | None:
        return self.m.encounters.get(encounter_id)

    async def keep_practitioner_roles(self, roles: Mapping[str, bytes]) -> None:
        for role_id, body in roles.items():
            self.m.roles[role_id] = orjson.loads(body)

    async def practitioner_role(self, role_id: str) -> dict[str, Any] | None:
        return self.m.roles.get(role_id)

    async def append_audit(self, nhs: str, entry: Mapping[str, Any]) -> None:
        self.m.audit.setdefault(str(nhs), []).insert(0, _stored(entry))


class FakeUploadStore:
    """UploadStore: the lease expires ``ttl_ms`` after it was taken or renewed, by ``Memory.now_s``."""

    def __init__(self, memory: Memory) -> None:
        self.m = memory

    def _holds(self, la: str, token: str) -> bool:
        return self.m.lease_holder(la) == token

    async def upload_report(self, la: str, sequence: int) -> bytes | None:
        return self.m.reports.get(la, {}).get(sequence)

    async def last_sequence(self, la: str) -> int | None:
        return self.m.sequences.get(la)

    async def acquire(self, la: str, token: str, ttl_ms: int) -> str | None:
        holder = self.m.lease_holder(la)
        if holder is not None:
            return holder
        self.m.leases[la] = Lease(token, self.m.now_s + ttl_ms / 1000)
        return None

    async def renew(self, la: str, token: str, ttl_ms: int) -> bool:
        if not self._holds(la, token):
            return False
        self.m.leases[la].expires_at = self.m.now_s + ttl_ms / 1000
        return True

    async def release(self, la: str, token: str) -> None:
        if self._holds(la, token):
            del self.m.leases[la]

    async def journal(self, la: str) -> bytes | None:
        return self.m.journals.get(la)

    async def journalled(self, las: Sequence[str]) -> list[str]:
        return [la for la in las if la in self.m.journals]

    async def push_body(self, la: str, token: str, chunk: bytes, *, first: bool) -> bool:
        if not self._holds(la, token):
            return False
        if first:
            self.m.journals.pop(la, None)
            self.m.bodies[la] = []
        self.m.bodies.setdefault(la, []).append(bytes(chunk))
        return True

    async def read_body(self, la: str) -> AsyncIterator[bytes]:
        for chunk in list(self.m.bodies.get(la, [])):
            yield chunk

    async def commit(self, la: str, token: str, entry: bytes) -> bool:
        if not self._holds(la, token):
            return False
        self.m.journals[la] = bytes(entry)
        return True

    async def finish(self, la: str, token: str, sequence: int, report: bytes | None) -> bool:
        if not self._holds(la, token):
            return False
        if report is not None:
            self.m.reports.setdefault(la, {})[sequence] = bytes(report)
            self.m.sequences[la] = max(sequence, self.m.sequences.get(la, 0))
        self.m.journals.pop(la, None)
        self.m.bodies.pop(la, None)
        return True
