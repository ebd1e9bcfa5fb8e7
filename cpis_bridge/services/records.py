"""Use-cases of the local-authority API: put, read, list and erase records, and apply batch uploads (CPF/CPR)."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.codes import FileCode, RecordCode, file_code
from cpis_bridge.core.errors import Conflict, NotFound, UnreadableInput, ValidationFailed
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.ports import AuditLog, Change, RecordStore
from cpis_bridge.core.records import (
    MAX_LOCAL_ID,
    Record,
    VisibilityWindows,
    parse_record,
    today_london,
    validate_local_id,
)

EPOCH = dt.date(1970, 1, 1)
BATCH = 500
SLICE = 50  # records validated between two yields to the event loop
APPLY_IN_FLIGHT = 2
UPLOAD_LOCK_TTL_S = 900


class UploadMode(StrEnum):
    DELTA = "delta"
    FULL = "full"


@dataclass(slots=True)
class UploadMeta:
    """What an upload declares about itself (headers or the JSON envelope); filled in while the body is read."""

    sequence: int | None = None
    mode: UploadMode | None = None
    record_count: int | None = None


@dataclass(slots=True)
class ValidatedUpload:
    accepted: list[Record] = field(default_factory=list)
    named: set[str] = field(default_factory=set)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    received: int = 0


def _count(items: Iterator[object]) -> int:
    """Read every item (raising UnreadableInput on a bad file) and count them."""
    return sum(1 for _ in items)


def epoch_day(day: dt.date) -> int:
    return (day - EPOCH).days


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
    if isinstance(value, bool):
        raise UnreadableInput("recordCount must be a non-negative integer", code=FileCode.UNREADABLE)
    if not isinstance(value, (int, str)):
        raise UnreadableInput("recordCount must be a non-negative integer", code=FileCode.UNREADABLE)
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise UnreadableInput("recordCount must be a non-negative integer", code=FileCode.UNREADABLE) from None
    if count < 0:
        raise UnreadableInput("recordCount must be a non-negative integer", code=FileCode.UNREADABLE)
    return count


class RecordService:
    def __init__(
        self,
        store: RecordStore,
        audit: AuditLog,
        *,
        windows: VisibilityWindows,
        test_numbers_only: bool,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.windows = windows
        self.test_numbers_only = test_numbers_only
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))

    def today(self) -> dt.date:
        return today_london(self.clock())

    def render(self, record: Record) -> dict[str, Any]:
        return record.to_api(visible=record.is_visible(self.today(), self.windows))

    def _change(
        self, record: Record, ctx: AuditContext, action: str, now: dt.datetime,
        template: dict[str, Any] | None = None,
    ) -> Change:
        """The write of one record with its audit entry. ``template`` (``ctx.entry(action, None, now)``, built once
        per batch) gives the same entry as ``ctx.entry`` without re-rendering the shared fields per record."""
        last = record.last_visible_day(self.windows)
        if template is None:
            entry = ctx.entry(action, str(record.nhs_number), now, localId=record.local_id, la=record.la)
        else:
            entry = {**template, "nhsNumber": str(record.nhs_number),
                     "detail": {"localId": record.local_id, "la": record.la}}
        return Change(record, None if last is None else epoch_day(last) + 1, entry)

    # -- single records -------------------------------------------------------------------------------------------
    async def put(self, ctx: AuditContext, la: str, local_id: str, body: object) -> tuple[Record, bool]:
        record = parse_record(
            body, la=la, today=self.today(), test_numbers_only=self.test_numbers_only, local_id=local_id
        )
        now = self.clock()
        [(code, _)] = await self.store.apply(la, [self._change(record, ctx, "record.put", now)])
        stored = await self.store.get(la, record.local_id)
        assert stored is not None
        return stored, code == "C"

    async def get(self, ctx: AuditContext, la: str, local_id: str) -> Record:
        validate_local_id(local_id)
        record = await self.store.get(la, local_id)
        if record is None:
            raise NotFound("no such record")
        await self.audit.append(
            str(record.nhs_number), ctx.entry("record.read", str(record.nhs_number), self.clock(), localId=local_id)
        )
        return record

    async def list_for_number(self, ctx: AuditContext, la: str, nhs_text: object) -> list[Record]:
        try:
            nhs = NhsNumber.parse(nhs_text)
        except InvalidNhsNumber as exc:
            raise ValidationFailed(str(exc), code=RecordCode.NHS_NUMBER_FORMAT) from None
        records = await self.store.for_number(la, nhs)
        if records:
            await self.audit.append(nhs, ctx.entry("record.list", nhs, self.clock(), count=len(records)))
        else:
            await self.audit.append(nhs, ctx.entry("record.list", None, self.clock(), count=0))
        return records

    async def erase(self, ctx: AuditContext, la: str, local_id: str) -> None:
        validate_local_id(local_id)
        record = await self.store.get(la, local_id)
        if record is None:
            raise NotFound("no such record")
        entry = ctx.entry("record.erase", str(record.nhs_number), self.clock(), localId=local_id)
        if not await self.store.erase(la, local_id, entry):
            raise NotFound("no such record")

    # -- uploads ----------------------------------------------------------------------------------------------------
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

    def validate_items(self, la: str, items: Iterable[object]) -> ValidatedUpload:
        """Validate every record of an upload (CPU-bound: run it in a thread). UnreadableInput aborts the file."""
        out = ValidatedUpload()
        today = self.today()
        for raw in items:
            record = self._validate_one(out, la, raw, today)
            if record is not None:
                out.accepted.append(record)
        return out

    def _validate_one(self, out: ValidatedUpload, la: str, raw: object, today: dt.date) -> Record | None:
        """Validate the next record of an upload into ``out`` (counts, names, rejections); the Record if accepted."""
        index = out.received
        out.received += 1
        try:
            record = parse_record(raw, la=la, today=today, test_numbers_only=self.test_numbers_only)
        except ValidationFailed as exc:
            lid = raw.get("localId") if isinstance(raw, dict) else None
            # Echoed in the report only when it is printable text (a lone surrogate could not even be encoded).
            lid_text = lid if isinstance(lid, str) and len(lid) <= MAX_LOCAL_ID and lid.isprintable() else None
            if lid_text is not None:
                out.named.add(lid_text)
            out.rejections.append(
                {"index": index, "localId": lid_text, "code": exc.code or RecordCode.VALIDATION_FAILED,
                 "detail": exc.detail}
            )
            return None
        if record.local_id in out.named:
            out.rejections.append(
                {"index": index, "localId": record.local_id, "code": RecordCode.VALIDATION_FAILED,
                 "detail": "localId appears more than once in this upload"}
            )
            return None
        out.named.add(record.local_id)
        return record

    async def apply_upload(
        self,
        ctx: AuditContext,
        la: str,
        meta: UploadMeta,
        read_items: Callable[[], Iterator[object]],
    ) -> tuple[dict[str, Any], bool]:
        """Check the whole file, then validate and apply it batch by batch. Returns (report, replayed).

        The first pass only reads the file (an unreadable file or a wrong count applies nothing); the second
        validates each batch in a worker thread while Redis applies the previous one, so neither waits for the other
        and the upload never holds all its records in memory.
        """
        if meta.sequence is not None:
            stored = await self.check_sequence(la, meta.sequence)
            if stored is not None:
                return stored, True
        received = await asyncio.to_thread(_count, read_items())
        if meta.sequence is None or meta.mode is None:
            raise UnreadableInput("the upload must state its sequence and mode", code=FileCode.UNREADABLE)
        if meta.record_count is not None and meta.record_count != received:
            raise UnreadableInput(
                f"recordCount is {meta.record_count} but the file holds {received} records",
                code=FileCode.UNREADABLE,
            )
        stored = await self.check_sequence(la, meta.sequence)  # JSON bodies state their sequence inside
        if stored is not None:
            return stored, True
        token = secrets.token_hex(8)
        if not await self.store.lock_uploads(la, token, UPLOAD_LOCK_TTL_S):
            raise Conflict("another upload for this local authority is in progress; retry when it has finished")
        try:
            return await self._apply(ctx, la, meta, read_items()), False
        finally:
            await self.store.unlock_uploads(la, token)

    def _validate_slice(
        self, out: ValidatedUpload, la: str, items: Iterator[object], ctx: AuditContext, now: dt.datetime,
        template: dict[str, Any], changes: list[Change], limit: int,
    ) -> int:
        """Validate up to ``limit`` more records, appending the accepted ones' changes; how many were read."""
        today = today_london(now)
        taken = 0
        for raw in items:
            taken += 1
            record = self._validate_one(out, la, raw, today)
            if record is not None:
                changes.append(self._change(record, ctx, "upload.record", now, template))
            if taken >= limit:
                break
        return taken

    async def _next_batch(
        self, out: ValidatedUpload, la: str, items: Iterator[object], ctx: AuditContext, now: dt.datetime,
        template: dict[str, Any],
    ) -> list[Change] | None:
        """Validate up to BATCH more records on the event loop, a slice at a time, yielding between slices so the
        loop keeps flushing the batch Redis is waiting for (and serving other requests); None when the file is
        done. (A worker thread would fight the loop for the GIL: each socket write or read costs the loop a whole
        switch interval, which serialises validation and Redis.)"""
        changes: list[Change] = []
        taken = 0
        while taken < BATCH:
            step = self._validate_slice(out, la, items, ctx, now, template, changes, min(SLICE, BATCH - taken))
            taken += step
            await asyncio.sleep(0)
            if step == 0:
                break
        return changes if taken else None

    async def _apply(self, ctx: AuditContext, la: str, meta: UploadMeta, items: Iterator[object]) -> dict[str, Any]:
        now = self.clock()
        template = ctx.entry("upload.record", None, now)
        validated = ValidatedUpload()
        accepted = 0
        pending: set[asyncio.Future[list[tuple[str, int]]]] = set()
        try:
            while (batch := await self._next_batch(validated, la, items, ctx, now, template)) is not None:
                if not batch:
                    continue
                accepted += len(batch)
                if len(pending) >= APPLY_IN_FLIGHT:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                pending.add(asyncio.ensure_future(self.store.apply(la, batch)))
                await asyncio.sleep(0)  # the apply task sends its batch; Redis runs it while the next is validated
            if pending:
                await asyncio.gather(*pending)
                pending = set()
        finally:
            for task in pending:
                task.cancel()
        code = file_code(accepted, len(validated.rejections))
        ended: list[str] = []
        if meta.mode is UploadMode.FULL and code in (FileCode.ALL_UPLOADED, FileCode.PARTIAL):
            ended = await self._end_absent(ctx, la, validated.named, now, accepted)
        report = {
            "sequence": meta.sequence,
            "mode": meta.mode.value if meta.mode else None,
            "fileCode": code.value,
            "received": validated.received,
            "accepted": accepted,
            "rejected": len(validated.rejections),
            "ended": len(ended),
            "endedLocalIds": ended,
            "rejections": validated.rejections,
        }
        if code in (FileCode.ALL_UPLOADED, FileCode.PARTIAL):
            assert meta.sequence is not None
            await self.store.save_upload(la, meta.sequence, orjson.dumps(report))
        return report

    async def _end_absent(
        self, ctx: AuditContext, la: str, named: set[str], now: dt.datetime, accepted: int
    ) -> list[str]:
        """A full upload is the whole caseload: end (end date = today) every open record it does not name."""
        if await self.store.count(la) == accepted:
            return []  # every record the LA holds was just written by this upload: none is absent
        today = self.today()
        index = await self.store.index(la)
        absent = sorted(lid for lid in index if lid not in named)
        ended: list[str] = []
        for start in range(0, len(absent), BATCH):
            changes = []
            for lid in absent[start : start + BATCH]:
                record = await self.store.get(la, lid)
                if record is None or (record.end_date is not None and record.end_date <= today):
                    continue
                ended_record = _ended(record, today)
                changes.append(self._change(ended_record, ctx, "upload.end", now))
                ended.append(lid)
            if changes:
                await self.store.apply(la, changes)
        return ended


def _ended(record: Record, day: dt.date) -> Record:
    from dataclasses import replace

    return replace(record, end_date=max(day, record.start_date))
