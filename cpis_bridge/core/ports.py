"""Protocols for the adapters the use-cases and the web layer need (implemented in store/, fhir/ and notify/, wired
in compose.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Protocol

from cpis_bridge.core.access import Access
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.records import Record, VisibilityWindows


@dataclass(frozen=True, slots=True)
class Change:
    """One record write for :meth:`RecordStore.apply`: the record, when its visibility ends, its audit entry."""

    record: Record
    invisible_from_day: int | None  # epoch day; None while the record has no end
    audit: Mapping[str, Any]


class RecordStore(Protocol):
    async def get(self, la: str, local_id: str) -> Record | None: ...

    async def for_number(self, la: str, nhs: NhsNumber) -> list[Record]: ...

    async def index(self, la: str) -> dict[str, str]: ...

    async def count(self, la: str) -> int: ...

    async def get_many(self, la: str, local_ids: Sequence[str]) -> list[Record | None]: ...

    async def get_indexed(self, la: str, entries: Sequence[tuple[str, str]]) -> list[Record | None]:
        """Records from entries of ``index`` (local id, NHS number) already read: the index is not read again."""
        ...

    async def put(self, la: str, change: Change) -> tuple[str, Record]:
        """Write one record; answer its code (C, M or U) and the record as stored, without reading it back."""
        ...

    async def apply(self, la: str, changes: Sequence[Change], *, lease: str | None = None) -> list[tuple[str, int]]:
        """Write the changes; with ``lease``, only while that upload lease is held (else raises UploadInterrupted)."""
        ...

    async def erase(self, la: str, local_id: str, audit: Callable[[str], Mapping[str, Any]]) -> bool:
        """Remove one record, audited with ``audit(nhs)`` for the NHS number it was held under; False when absent."""
        ...


class UploadStore(Protocol):
    """Per-LA upload bookkeeping: applied sequences and their reports, the upload lease (a lock that expires unless
    renewed) and the journal of the upload that holds it. Every write but ``acquire`` is refused (False) unless the
    caller's lease token is still the LA's."""

    async def upload_report(self, la: str, sequence: int) -> bytes | None: ...

    async def last_sequence(self, la: str) -> int | None: ...

    async def acquire(self, la: str, token: str, ttl_ms: int) -> str | None:
        """Take the lease: None when taken, else the token that holds it."""
        ...

    async def renew(self, la: str, token: str, ttl_ms: int) -> bool: ...

    async def release(self, la: str, token: str) -> None: ...

    async def journal(self, la: str) -> bytes | None:
        """The committed journal entry (the upload's own description), or None."""
        ...

    async def journalled(self, las: Sequence[str]) -> list[str]:
        """Which of these LAs hold a committed journal entry."""
        ...

    async def push_body(self, la: str, token: str, chunk: bytes, *, first: bool) -> bool: ...

    def read_body(self, la: str) -> AsyncIterator[bytes]: ...

    async def commit(self, la: str, token: str, entry: bytes) -> bool: ...

    async def finish(self, la: str, token: str, sequence: int, report: bytes | None) -> bool:
        """Store the report and the sequence (unless ``report`` is None) and drop the journal, in one step."""
        ...


class AuditLog(Protocol):
    async def append(self, nhs: NhsNumber | None, entry: Mapping[str, Any]) -> None: ...

    async def query(self, nhs: NhsNumber, limit: int = 1000) -> list[dict[str, Any]]: ...

    def tag(self, nhs: NhsNumber) -> str: ...  # the keyed hash standing in for the number in audit entries


class LookupStatus(IntEnum):
    """What the access step did (access.lua answers the number)."""

    NOT_RECORDED = 0  # no access recorded: nothing visible, or the look-up was not unscheduled
    RECORDED = 1
    REPEAT = 2  # the source event was recorded before: that access stands


@dataclass(frozen=True, slots=True)
class LookupOutcome:
    """What the access step found and did. ``recent``: the child's newest accesses (at most 25, this one included),
    when asked for and a record is visible."""

    records: list[Record]
    status: LookupStatus
    access: Access | None
    access_id: str | None
    recent: list[Access] = field(default_factory=list)


class AccessStore(Protocol):
    async def lookup(
        self,
        nhs: NhsNumber,
        *,
        today_day: int,
        windows: VisibilityWindows,
        record_access: Access | None,
        audit_with: Mapping[str, Any],
        audit_without: Mapping[str, Any],
        encounter: Mapping[str, Any] | None = None,
        recent: bool = False,
    ) -> LookupOutcome: ...

    async def history(self, nhs: NhsNumber) -> tuple[list[Record], list[tuple[str, Access]]]: ...

    async def encounter(self, encounter_id: str) -> dict[str, Any] | None: ...

    async def keep_practitioner_roles(self, roles: Mapping[str, bytes]) -> None:
        """Keep PractitionerRoles (id -> JSON) that answers referred to, for their reads."""
        ...

    async def practitioner_role(self, role_id: str) -> dict[str, Any] | None: ...

    async def append_audit(self, nhs: NhsNumber, entry: Mapping[str, Any]) -> None:
        """Append to the child's audit trail (kept under the keyed hash of the number)."""
        ...


# -- notification delivery (services/delivery.py; store/outbox.py and notify/ implement these) ----------------------


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One delivery job read from the notification queue. ``channel`` is None on first delivery (every channel of
    the LA is due); retries carry the one channel still owed. Times are epoch milliseconds."""

    id: str
    la: str
    ref: str  # the LA's inbox entry id: the notification's fixed body parts
    channel: str | None = None
    attempt: int = 0
    first_ms: int = 0  # when the notification was queued (max age counts from here)
    client_error_since_ms: int = 0  # first of an unbroken run of 4xx answers (0 = none)
    access_id: str = ""  # the access notified ('' on entries queued before it was carried)
    problem: str = ""  # why the stored entry could not be read ('' = it could): dead-lettered on sight


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # 5xx, 408/429, timeout, refused
    CLIENT_ERROR = "client-error"  # any other 4xx
    GONE = "gone"  # 410


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What one delivery attempt achieved. ``retry_after_s`` is the receiver's Retry-After, if it sent one."""

    outcome: DeliveryOutcome
    status: int | None = None
    retry_after_s: float | None = None
    detail: str = ""


class Channel(Protocol):
    """A delivery channel (webhook, FHIR Communication) of one LA."""

    name: str

    async def deliver(self, la: str, notification_id: str, nhs: NhsNumber, body: bytes) -> DeliveryResult: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery given up on: which channel, why (no NHS number, no body: those stay in the inbox entry)."""

    channel: str
    reason: str
    status: int | None = None
    detail: str = ""  # e.g. which step failed and the exception type (never a value from the data)


@dataclass(frozen=True, slots=True)
class ChannelStats:
    pending: int = 0
    retrying: int = 0
    dead: int = 0
    oldest_pending_s: float = 0.0

    def to_api(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "retrying": self.retrying,
            "dead": self.dead,
            "oldestPendingSeconds": round(self.oldest_pending_s, 3),
        }


class Outbox(Protocol):
    """The notification queue as the relay uses it: consumer-group reads, reclaim, delayed retries, dead letters,
    endpoint holds and pauses (the admin's view of it: DeliveryLedger)."""

    async def ensure_group(self) -> None: ...

    async def read(self, consumer: str, count: int, block_ms: int) -> list[QueueEntry]: ...

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[QueueEntry]: ...

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Keep entries the consumer is still handling from looking abandoned (their idle time starts again)."""
        ...

    async def load(self, entries: Sequence[QueueEntry]) -> list[dict[str, str] | Exception | None]:
        """Each entry's inbox fields (with its recent accesses); None when the inbox entry is gone; the exception
        when it could not be read (one bad entry never fails the others)."""
        ...

    async def settle(
        self,
        entry: QueueEntry,
        *,
        notification_id: str | None,
        retries: Sequence[tuple[QueueEntry, int]] = (),
        dead: Sequence[DeadLetter] = (),
        holds: Sequence[QueueEntry] = (),
    ) -> bool:
        """Atomically: acknowledge and drop ``entry``, schedule ``retries`` (entry, due epoch ms), write ``dead``,
        and set ``holds`` (entries with their channel) aside for their endpoint until it can take them (release).
        False (and nothing written) when another consumer settled the entry first."""
        ...

    async def held_endpoints(self) -> list[tuple[str, str]]:
        """(la, channel) of every endpoint with entries set aside."""
        ...

    async def release(self, la: str, channel: str, count: int, expired_before_ms: int) -> int:
        """Put back on the queue the ``count`` oldest entries held for the endpoint and every one first queued at or
        before ``expired_before_ms`` (so the maximum age still applies); returns how many are still held."""
        ...

    async def promote(self, now_ms: int, limit: int) -> int: ...

    async def pause(self, la: str, channel: str, until_ms: int) -> None: ...

    async def paused_until(self, endpoints: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]: ...


class DeliveryLedger(Protocol):
    """What the delivery admin reads and repairs: per channel counts and ages, dead letters put back on their queue."""

    async def stats(self, channels_of: Mapping[str, Sequence[str]], now_ms: int) -> dict[str, ChannelStats]: ...

    async def requeue_dead(self, dead_id: str, now_ms: int) -> bool: ...


class Inbox(Protocol):
    """An LA's pull inbox: every notification, in queue order, with acknowledgements."""

    async def page(self, la: str, after: str | None, limit: int) -> list[tuple[str, dict[str, str], bool]]: ...

    async def newest(
        self, la: str, before: str | None, oldest: str | None, count: int
    ) -> list[tuple[str, dict[str, str], bool]]: ...

    async def matching(
        self,
        la: str,
        before: str | None,
        oldest: str | None,
        want: int,
        budget: int,
        care_setting: str | None,
        acknowledged: bool | None,
    ) -> tuple[list[tuple[str, dict[str, str], bool]], str | None, int]: ...

    async def entry(self, la: str, ref: str) -> tuple[dict[str, str], str | None] | None: ...

    async def find(self, la: str, notification_id: str) -> str | None: ...

    async def ack(self, la: str, ref: str, by: str = "") -> None: ...

    async def heads(self, las: Sequence[str]) -> dict[str, str]:
        """The newest entry id of each LA's inbox ("0-0" when empty): where a tail starts."""
        ...

    async def tail(self, after: Mapping[str, str], block_ms: int) -> list[tuple[str, str, dict[str, str]]]:
        """(la, entry id, fields) of entries newer than ``after[la]``, waiting up to ``block_ms`` for one."""
        ...


# -- Flag sync (services/sync.py; adapters store/sync.py and fhir/flag_sync.py) ---------------------------------


@dataclass(frozen=True, slots=True)
class SyncItem:
    """One record to mirror, coalesced from every queue entry read for it in one batch."""

    la: str
    local_id: str
    entry_ids: tuple[str, ...]
    queued_ms: int  # when the oldest of those entries was first queued
    tombstone: Record | None = None  # the erased record, when an entry carried one
    attempts: int = 0  # failed writes of this record so far (its own backoff, not the server's)


class FlagStatus(StrEnum):
    """The Flag statuses a record is mirrored with (FHIR flag-status codes)."""

    ACTIVE = "active"
    INACTIVE = "inactive"
    ENTERED_IN_ERROR = "entered-in-error"


@dataclass(frozen=True, slots=True)
class FlagWrite:
    """Write the record's Flag with this status."""

    record: Record
    status: FlagStatus


class WriteOutcome(StrEnum):
    OK = "ok"
    RETRY = "retry"  # transient
    CONFLICT = "conflict"  # 409, or a version 412: re-read and resend
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """How one Flag write ended."""

    outcome: WriteOutcome
    status: int = 0
    reason: str = ""
    operation_outcome: str | None = None  # the server's OperationOutcome, JSON
    retry_after_s: float | None = None


class SyncQueue(Protocol):
    async def read(self, consumer: str, count: int, block_ms: int) -> list[SyncItem]: ...

    async def current(self, items: Sequence[SyncItem]) -> list[Record | None]: ...

    async def done(self, items: Sequence[SyncItem]) -> None: ...

    async def defer(self, items: Sequence[SyncItem], due_ms: int | Sequence[int]) -> None: ...

    async def dead(self, item: SyncItem, result: WriteResult) -> None: ...

    async def move_due(self, now_ms: int) -> int: ...

    async def schedule_due(self, today_day: int) -> int: ...

    async def paused_until(self) -> int: ...

    async def pause_until(self, until_ms: int, now_ms: int) -> None: ...

    async def lock(self, items: Sequence[SyncItem], owner: str, ttl_ms: int) -> list[bool]: ...

    async def unlock(self, items: Sequence[SyncItem]) -> None: ...


class FlagServer(Protocol):
    """The FHIR server Flags are mirrored to. Reading its CapabilityStatement at start-up is the composition root's
    step on the adapter; the relay only writes, and probes while the server is unreachable."""

    async def write(self, writes: Sequence[FlagWrite]) -> list[WriteResult]: ...

    def pause(self, seconds: float) -> None: ...

    def paused_for(self) -> float: ...

    async def probe(self) -> bool: ...

    @property
    def reachable(self) -> bool: ...

    @property
    def serialised(self) -> bool: ...


#: A Flag as the sync server holds it (FHIR JSON); reconcile passes it back to the catalogue without reading it.
ServerFlag = Mapping[str, Any]


class FlagCatalogue(Protocol):
    """The sync server's Flags as reconcile (services/reconcile.py) sees them: ours listed by record key
    (``"<la>|<localId>"``), which of several to keep, whether one says what a write calls for, and repairs."""

    async def our_flags(self, tick: Callable[[int], None] | None = None) -> dict[str, list[ServerFlag]]: ...

    def kept(self, key: str, flags: Sequence[ServerFlag]) -> ServerFlag: ...

    def live(self, flags: Sequence[ServerFlag]) -> list[ServerFlag]: ...

    def describes(self, flag: ServerFlag, write: FlagWrite) -> bool: ...

    async def write(
        self, writes: Sequence[FlagWrite], ids: Sequence[str | None] | None = None
    ) -> list[WriteResult]: ...

    async def retire(self, flag: ServerFlag) -> bool: ...


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

    async def subject(self, nhs: NhsNumber) -> SubjectData: ...

    async def audit_system(self, entry: Mapping[str, Any]) -> None: ...


class StoreHealth(Protocol):
    async def ping(self, timeout_s: float) -> bool: ...  # answered within timeout_s; False for any failure


class WebSessions(Protocol):
    """Server-side sessions of the web views: opaque data under a random id, gone ``idle_s`` after the last save."""

    async def load(self, sid: str) -> bytes | None: ...

    async def save(self, sid: str, data: bytes, idle_s: int) -> None: ...

    async def drop(self, sid: str) -> None: ...

    async def alive(self, sid: str) -> bool: ...


class SignInThrottle(Protocol):
    """Failed sign-ins per client address, over a fixed window."""

    async def blocked(self, who: str) -> bool: ...

    async def failed(self, who: str) -> int: ...


class LaunchStore(Protocol):
    """The clinician view's launch contexts: kept briefly under an opaque random id, taken at most once."""

    async def mint(self, context: dict[str, Any]) -> str: ...

    async def take(self, cid: str) -> dict[str, Any] | None: ...
