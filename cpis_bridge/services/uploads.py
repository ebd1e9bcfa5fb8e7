"""Batch uploads (CPF/CPR codes): one per LA at a time under a short lease, journalled in the store before anything is
applied so that any process completes an interrupted one, validated and applied batch by batch, with the full-upload
rules (an empty file ends nothing; ending much of a caseload needs the count confirmed)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import IO, Any

import orjson

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import today_london
from cpis_bridge.core.codes import FileCode, RecordCode, file_code
from cpis_bridge.core.errors import (
    Conflict,
    MassEndRefused,
    UnreadableInput,
    UploadInterrupted,
    ValidationFailed,
)
from cpis_bridge.core.ports import Change, UploadStore
from cpis_bridge.core.records import MAX_LOCAL_ID, Record, parse_record
from cpis_bridge.services.records import RecordWrites

log = logging.getLogger("cpis_bridge.uploads")

BATCH = 500
SLICE = 50  # records validated between two yields to the event loop
APPLY_IN_FLIGHT = 2
CHUNK = 1 << 20  # journal body chunk
LEASE_MS = 10_000  # a dead holder's lease lapses this long after its last renewal
RENEW_S = 2.0
SAME_SEQUENCE_WAIT_S = 60.0  # a re-send waits this long for the attempt it repeats (or its lease) to end
MASS_END_MIN = 10  # ending this many records or fewer never needs confirming
SURE_RATE = 5_000  # records/s an upload is sure to be applied at, even on a busy machine (it does 20,000+)


class UploadMode(StrEnum):
    DELTA = "delta"
    FULL = "full"


@dataclass(slots=True)
class UploadMeta:
    """What an upload declares about itself (headers or the JSON envelope); filled in while the body is read."""

    sequence: int | None = None
    mode: UploadMode | None = None
    record_count: int | None = None


ReadItems = Callable[[str, IO[bytes], UploadMeta], Iterator[object]]


@dataclass(slots=True)
class ValidatedUpload:
    named: set[str] = field(default_factory=set)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    received: int = 0


@dataclass(slots=True)
class UploadControl:
    """Between the web edge and one upload. ``answer_by``: once the process is stopping, the monotonic time by which
    the upload must be answered (None until then); an upload that could not be applied by then stops before it
    commits, having applied nothing. ``phase``: reading (the body, the checks), journalling, then applying: from
    then on the upload is completed whatever happens to this process."""

    answer_by: Callable[[], float | None] = lambda: None
    phase: str = "reading"

    @property
    def committed(self) -> bool:
        return self.phase == "applying"


@dataclass(slots=True)
class Journal:
    """What a process needs to complete an upload it did not receive: the body is stored beside it."""

    sequence: int
    mode: UploadMode
    content_type: str
    at: str  # the upload's instant: its audit entries, its "today" for validation and end dates
    templates: dict[str, dict[str, Any]]  # audit entry templates by action
    to_end: list[str]  # full mode: the records it ends, decided (and confirmed) before anything was applied

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "sequence": self.sequence,
                "mode": self.mode.value,
                "contentType": self.content_type,
                "at": self.at,
                "templates": self.templates,
                "toEnd": self.to_end,
            }
        )

    @classmethod
    def loads(cls, raw: bytes) -> Journal:
        d = orjson.loads(raw)
        return cls(int(d["sequence"]), UploadMode(d["mode"]), d["contentType"], d["at"], d["templates"], d["toEnd"])


def parse_sequence(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UnreadableInput("sequence must be a positive integer", code=FileCode.UNREADABLE)
    try:
        seq = int(value)
    except ValueError:
        raise UnreadableInput("sequence must be a positive integer", code=FileCode.UNREADABLE) from None
    if seq < 1 or seq > 2**53:
        raise UnreadableInput("sequence must be a positive integer", code=FileCode.UNREADABLE)
    return seq


def parse_mode(value: object) -> UploadMode:
    try:
        return UploadMode(str(value))
    except ValueError:
        raise UnreadableInput("mode must be 'delta' or 'full'", code=FileCode.UNREADABLE) from None


def parse_count(value: object) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UnreadableInput("recordCount must be a non-negative integer", code=FileCode.UNREADABLE)
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise UnreadableInput("recordCount must be a non-negative integer", code=FileCode.UNREADABLE) from None
    if count < 0:
        raise UnreadableInput("recordCount must be a non-negative integer", code=FileCode.UNREADABLE)
    return count


def named_id(raw: object) -> str | None:
    """The localId a record names (accepted or not), when it is printable text: a full upload never ends it."""
    lid = raw.get("localId") if isinstance(raw, dict) else None
    return lid if isinstance(lid, str) and len(lid) <= MAX_LOCAL_ID and lid.isprintable() else None


def scan(items: Iterator[object]) -> ValidatedUpload:
    """Read the whole file (raising UnreadableInput on a bad one): its record count and the localIds it names."""
    out = ValidatedUpload()
    named = out.named
    for raw in items:
        out.received += 1
        lid = named_id(raw)
        if lid is not None:
            named.add(lid)
    return out


def _ended(record: Record, day: dt.date) -> Record:
    return replace(record, end_date=max(day, record.start_date))


def _is_ended(record: Record, day: dt.date) -> bool:
    return record.end_date is not None and record.end_date <= day


class _Lease:
    """A held upload lease, renewed in the background until released."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.lost = False


class UploadService:
    def __init__(
        self,
        writes: RecordWrites,
        store: UploadStore,
        read_items: ReadItems,
        *,
        max_end_fraction: float,
        on_mass_end_refused: Callable[[], None] = lambda: None,
        on_resumed: Callable[[], None] = lambda: None,
    ) -> None:
        self.writes = writes
        self.store = store
        self.read_items = read_items
        self.max_end_fraction = max_end_fraction
        self.on_mass_end_refused = on_mass_end_refused
        self.on_resumed = on_resumed

    async def check_sequence(self, la: str, sequence: int) -> dict[str, Any] | None:
        """The stored report when this sequence was already applied; Conflict when it is stale and unseen."""
        stored = await self.store.upload_report(la, sequence)
        if stored is not None:
            report: dict[str, Any] = orjson.loads(stored)
            return report
        last = await self.store.last_sequence(la)
        if last is not None and sequence < last:
            raise Conflict(
                f"upload sequence {sequence} is lower than the last applied sequence {last} and was never applied",
                code=FileCode.UNREADABLE,
            )
        return None

    # -- the use-case -------------------------------------------------------------------------------------------
    async def apply_upload(
        self,
        ctx: AuditContext,
        la: str,
        meta: UploadMeta,
        content_type: str,
        body: IO[bytes],
        *,
        confirm_end: int | None = None,
        control: UploadControl | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Apply one upload file (spooled in ``body``). Returns (report, replayed).

        Before anything is applied: the whole file is read (an unreadable file or a wrong count applies nothing),
        the LA's lease is taken, a full upload's ends are decided (and refused when too many and unconfirmed), and
        the file is journalled. Then the records are validated and applied batch by batch, absent records ended,
        and the report stored with the sequence in the step that drops the journal.
        """
        control = control or UploadControl()
        if meta.sequence is not None and (stored := await self.check_sequence(la, meta.sequence)) is not None:
            return stored, True
        body.seek(0)
        scanned = await asyncio.to_thread(scan, self.read_items(content_type, body, meta))
        if meta.sequence is None or meta.mode is None:
            raise UnreadableInput("the upload must state its sequence and mode", code=FileCode.UNREADABLE)
        if meta.record_count is not None and meta.record_count != scanned.received:
            raise UnreadableInput(
                f"recordCount is {meta.record_count} but the file holds {scanned.received} records",
                code=FileCode.UNREADABLE,
            )
        if (stored := await self.check_sequence(la, meta.sequence)) is not None:  # JSON states its sequence inside
            return stored, True
        _check_stopping(control, 0.0)
        if scanned.received == 0:  # nothing to apply, and never a caseload of nothing: CPF04, the sequence unused
            return _report(meta.sequence, meta.mode, FileCode.NONE_UPLOADED, ValidatedUpload(), 0, []), False
        async with self._lease(la, meta.sequence, control) as lease:
            await self._complete_journal(la, lease)  # an upload left by a holder that died comes first
            if (stored := await self.check_sequence(la, meta.sequence)) is not None:
                return stored, True
            now = self.writes.clock()
            to_end: list[str] = []
            if meta.mode is UploadMode.FULL:
                to_end = await self._to_end(la, scanned.named, today_london(now))
                await self._check_mass_end(la, to_end, confirm_end, content_type, body, now)
            journal = Journal(
                meta.sequence,
                meta.mode,
                content_type,
                now.isoformat(),
                {action: ctx.entry(action, None, now) for action in ("upload.record", "upload.end")},
                to_end,
            )
            await self._journal(la, lease, journal, body, control, scanned.received / SURE_RATE)
            body.seek(0)
            return await self._run(la, lease, journal, self.read_items(content_type, body, UploadMeta())), False

    async def resume(self, las: Sequence[str], stopping: Callable[[], bool] = lambda: False) -> int:
        """Complete every journalled upload of these LAs whose lease has lapsed (its holder died); how many."""
        done = 0
        for la in await self.store.journalled(las):
            if stopping():
                break
            raw = await self.store.journal(la)
            if raw is None:
                continue
            journal = Journal.loads(raw)
            try:
                control = UploadControl(lambda: 0.0 if stopping() else None)
                async with self._lease(la, journal.sequence, control, wait_s=0) as lease:
                    if await self._complete_journal(la, lease):
                        done += 1
            except Conflict:
                continue  # a live holder: it completes the journal itself
        return done

    async def run_resumer(self, las: Sequence[str], stop: asyncio.Event, interval_s: float) -> None:
        """Every ``interval_s``, complete uploads left by processes that died (at start-up first)."""
        while not stop.is_set():
            try:
                await self.resume(las, stop.is_set)
            except Exception:  # the store may be down for a while: try again next round
                log.exception("upload.resume_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await stop.wait()

    # -- steps ---------------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lease(
        self, la: str, sequence: int, control: UploadControl, wait_s: float = SAME_SEQUENCE_WAIT_S
    ) -> AsyncIterator[_Lease]:
        """Hold the LA's upload lease. Another upload holding it is a Conflict at once, except an attempt of the
        same sequence (a re-send after a crash, or its completion by another process): that one is waited for."""
        token = f"{sequence}.{secrets.token_hex(8)}"
        deadline = time.monotonic() + wait_s
        while (holder := await self.store.acquire(la, token, LEASE_MS)) is not None:
            if not holder.startswith(f"{sequence}.") or time.monotonic() >= deadline:
                raise Conflict("another upload for this local authority is in progress; retry when it has finished")
            _check_stopping(control, 0.0)
            await asyncio.sleep(0.1)
        lease = _Lease(token)
        renewer = asyncio.create_task(self._renew(la, lease), name="upload-lease")
        try:
            yield lease
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            with contextlib.suppress(Exception):  # unreleased, it lapses on its own
                await asyncio.shield(self.store.release(la, token))

    async def _renew(self, la: str, lease: _Lease) -> None:
        while not lease.lost:
            await asyncio.sleep(RENEW_S)
            try:
                lease.lost = not await self.store.renew(la, lease.token, LEASE_MS)
            except Exception:  # a failed renewal is retried; the lease itself has LEASE_MS of slack
                log.warning("upload.lease_renewal_failed")

    async def _complete_journal(self, la: str, lease: _Lease) -> bool:
        """Complete the LA's journalled upload, if there is one (the caller holds the lease)."""
        raw = await self.store.journal(la)
        if raw is None:
            return False
        try:
            journal = Journal.loads(raw)
            with tempfile.TemporaryFile() as f:
                async for chunk in self.store.read_body(la):
                    f.write(chunk)
                f.seek(0)
                await self._run(la, lease, journal, self.read_items(journal.content_type, f, UploadMeta()))
        except (UnreadableInput, ValueError, KeyError, TypeError):
            # A journal that cannot be read back (the store lost part of it) would block the LA's uploads for good:
            # it is dropped, its sequence unused, and the LA's next upload (or a re-send) applies the file.
            log.error("upload.journal_unreadable", extra={"la": la})
            await self.store.finish(la, lease.token, 0, None)
            return False
        self.on_resumed()
        log.info("upload.completed_from_journal", extra={"la": la, "sequence": journal.sequence})
        return True

    async def _journal(
        self, la: str, lease: _Lease, journal: Journal, body: IO[bytes], control: UploadControl, work_s: float
    ) -> None:
        """Store the body, then commit the journal entry: from then on the upload is completed whatever happens. A
        stopping process commits only an upload it can apply (``work_s``) before it must answer."""
        control.phase = "journalling"
        body.seek(0)
        first = True
        while chunk := body.read(CHUNK):
            if not await self.store.push_body(la, lease.token, chunk, first=first):
                raise UploadInterrupted("another process took over this upload", applied=False)
            first = False
            _check_stopping(control, work_s)
        _check_stopping(control, work_s)
        if not await self.store.commit(la, lease.token, journal.dumps()):
            raise UploadInterrupted("another process took over this upload", applied=False)
        control.phase = "applying"

    async def _to_end(self, la: str, named: set[str], today: dt.date) -> list[str]:
        """A full upload is the whole caseload: the LA's records it does not name and that have not ended."""
        absent = [(lid, nhs) for lid, nhs in (await self.writes.store.index(la)).items() if lid not in named]
        out: list[str] = []
        for start in range(0, len(absent), BATCH * 2):
            chunk = absent[start : start + BATCH * 2]
            records = await self.writes.store.get_indexed(la, chunk)
            out.extend(r.local_id for r in records if r is not None and not _is_ended(r, today))
        return sorted(out)

    async def _check_mass_end(
        self,
        la: str,
        to_end: list[str],
        confirm_end: int | None,
        content_type: str,
        body: IO[bytes],
        now: dt.datetime,
    ) -> None:
        """Refuse a full upload that would end more than the allowed fraction of the LA's visible records (and more
        than a handful) unless the caller confirmed exactly that number; a file that accepts no record ends nothing
        and so is never refused."""
        n = len(to_end)
        if n <= MASS_END_MIN or confirm_end == n:
            return
        today = today_london(now)
        visible = 0
        entries = list((await self.writes.store.index(la)).items())
        for start in range(0, len(entries), BATCH * 2):
            for r in await self.writes.store.get_indexed(la, entries[start : start + BATCH * 2]):
                if r is not None and r.is_visible(today, self.writes.windows):
                    visible += 1
        if n <= self.max_end_fraction * visible:
            return
        body.seek(0)
        if not await asyncio.to_thread(self._accepts_any, la, self.read_items(content_type, body, UploadMeta()), today):
            return
        self.on_mass_end_refused()
        raise MassEndRefused(
            f"this full upload would end {n} of the {visible} visible records of this local authority; if that is "
            f"intended, send it again with the header Upload-Confirm-End: {n}",
            would_end=n,
        )

    def _accepts_any(self, la: str, items: Iterator[object], today: dt.date) -> bool:
        for raw in items:
            try:
                parse_record(raw, la=la, today=today, test_numbers_only=self.writes.test_numbers_only)
            except ValidationFailed:
                continue
            return True
        return False

    async def _run(self, la: str, lease: _Lease, journal: Journal, items: Iterator[object]) -> dict[str, Any]:
        """Validate and apply a journalled upload batch by batch, end what it ends, store the report and drop the
        journal. Re-running it after an interruption is safe: a record already written is found unchanged."""
        now = dt.datetime.fromisoformat(journal.at)
        validated = ValidatedUpload()
        accepted = 0
        template = journal.templates["upload.record"]
        pending: set[asyncio.Future[list[tuple[str, int]]]] = set()
        try:
            while (batch := await self._next_batch(validated, la, items, now, template)) is not None:
                if not batch:
                    continue
                accepted += len(batch)
                if len(pending) >= APPLY_IN_FLIGHT:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                pending.add(asyncio.ensure_future(self.writes.store.apply(la, batch, lease=lease.token)))
                await asyncio.sleep(0)  # the apply task sends its batch; Redis runs it while the next is validated
            if pending:
                await asyncio.gather(*pending)
                pending = set()
        finally:
            for task in pending:
                task.cancel()
        code = file_code(accepted, len(validated.rejections))
        used = code in (FileCode.ALL_UPLOADED, FileCode.PARTIAL)
        ended = journal.to_end if journal.mode is UploadMode.FULL and used else []
        await self._end(la, lease, ended, today_london(now), journal.templates["upload.end"])
        report = _report(journal.sequence, journal.mode, code, validated, accepted, ended)
        if not await self.store.finish(la, lease.token, journal.sequence, orjson.dumps(report) if used else None):
            raise UploadInterrupted("another process took over this upload", applied=True)
        return report

    async def _next_batch(
        self,
        out: ValidatedUpload,
        la: str,
        items: Iterator[object],
        now: dt.datetime,
        template: dict[str, Any],
    ) -> list[Change] | None:
        """Validate up to BATCH more records on the event loop, a slice at a time, yielding between slices so the
        loop keeps flushing the batch Redis is waiting for (and serving other requests); None when the file is
        done. (Not a worker thread, which fought the loop for the GIL: bench/README.md.)"""
        changes: list[Change] = []
        taken = 0
        today = today_london(now)
        while taken < BATCH:
            step = self._validate_slice(out, la, items, today, template, changes, min(SLICE, BATCH - taken))
            taken += step
            await asyncio.sleep(0)
            if step == 0:
                break
        return changes if taken else None

    def _validate_slice(
        self,
        out: ValidatedUpload,
        la: str,
        items: Iterator[object],
        today: dt.date,
        template: dict[str, Any],
        changes: list[Change],
        limit: int,
    ) -> int:
        """Validate up to ``limit`` more records, appending the accepted ones' changes; how many were read."""
        taken = 0
        for raw in items:
            taken += 1
            record = self._validate_one(out, la, raw, today)
            if record is not None:
                changes.append(self.writes.change(record, template))
            if taken >= limit:
                break
        return taken

    def _validate_one(self, out: ValidatedUpload, la: str, raw: object, today: dt.date) -> Record | None:
        """Validate the next record of an upload into ``out`` (counts, names, rejections); the Record if accepted."""
        index = out.received
        out.received += 1
        try:
            record = parse_record(raw, la=la, today=today, test_numbers_only=self.writes.test_numbers_only)
        except ValidationFailed as exc:
            # Echoed in the report only when it is printable text (a lone surrogate could not even be encoded).
            lid_text = named_id(raw)
            if lid_text is not None:
                out.named.add(lid_text)
            out.rejections.append(
                {
                    "index": index,
                    "localId": lid_text,
                    "code": exc.code or RecordCode.VALIDATION_FAILED,
                    "detail": exc.detail,
                }
            )
            return None
        if record.local_id in out.named:
            out.rejections.append(
                {
                    "index": index,
                    "localId": record.local_id,
                    "code": RecordCode.VALIDATION_FAILED,
                    "detail": "localId appears more than once in this upload",
                }
            )
            return None
        out.named.add(record.local_id)
        return record

    async def _end(
        self, la: str, lease: _Lease, local_ids: list[str], today: dt.date, template: dict[str, Any]
    ) -> None:
        """End (end date = the upload's day) the given records, skipping any already ended (so a re-run after an
        interruption ends nothing twice)."""
        for start in range(0, len(local_ids), BATCH):
            records = await self.writes.store.get_many(la, local_ids[start : start + BATCH])
            changes = [
                self.writes.change(_ended(r, today), template)
                for r in records
                if r is not None and not _is_ended(r, today)
            ]
            if changes:
                await self.writes.store.apply(la, changes, lease=lease.token)


def _check_stopping(control: UploadControl, work_s: float) -> None:
    answer_by = control.answer_by()
    if answer_by is not None and time.monotonic() + work_s >= answer_by:
        raise UploadInterrupted(
            "the service is stopping; nothing of this upload was applied: send it again", applied=False
        )


def _report(
    sequence: int, mode: UploadMode, code: FileCode, validated: ValidatedUpload, accepted: int, ended: list[str]
) -> dict[str, Any]:
    return {
        "sequence": sequence,
        "mode": mode.value,
        "fileCode": code.value,
        "received": validated.received,
        "accepted": accepted,
        "rejected": len(validated.rejections),
        "ended": len(ended),
        "endedLocalIds": ended,
        "rejections": validated.rejections,
    }
