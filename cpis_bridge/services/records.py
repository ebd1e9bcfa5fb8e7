"""Record writes: what every write of a record shares (RecordWrites: the store, the visibility windows, the test-range
rule, the clock and the Change a record becomes), and the single-record use-cases of the local-authority API (put,
read, list, erase). Uploads (uploads.py) write through the same RecordWrites."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import Clock, epoch_day, today_london, utc_now
from cpis_bridge.core.codes import RecordCode
from cpis_bridge.core.errors import NotFound, ValidationFailed
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.ports import AuditLog, Change, RecordStore
from cpis_bridge.core.records import Record, VisibilityWindows, parse_record, validate_local_id


@dataclass(frozen=True, slots=True)
class RecordWrites:
    """What every record write shares, for single records (RecordService) and uploads (UploadService)."""

    store: RecordStore
    windows: VisibilityWindows
    test_numbers_only: bool
    clock: Clock = utc_now

    def today(self) -> dt.date:
        return today_london(self.clock())

    def change(self, record: Record, template: dict[str, Any]) -> Change:
        """The write of one record with its audit entry; ``template`` is ``ctx.entry(action, None, now)`` (built once
        per batch in uploads), completed here with the record's number and ids. The schedule day is the day after
        the record's last visible one (its Flag turns inactive then)."""
        last = record.last_visible_day(self.windows)
        entry = {
            **template,
            "nhsNumber": str(record.nhs_number),
            "detail": {"localId": record.local_id, "la": record.la},
        }
        return Change(record, None if last is None else epoch_day(last) + 1, entry)


class RecordService:
    """Single records: put, read, list by NHS number, erase; each audited."""

    def __init__(
        self,
        store: RecordStore,
        audit: AuditLog,
        *,
        windows: VisibilityWindows,
        test_numbers_only: bool,
        clock: Clock = utc_now,
    ) -> None:
        self.writes = RecordWrites(store, windows, test_numbers_only, clock)
        self.store = store
        self.audit = audit
        self.clock = clock

    def render(self, record: Record) -> dict[str, Any]:
        return record.to_api(visible=record.is_visible(self.writes.today(), self.writes.windows))

    async def put(self, ctx: AuditContext, la: str, local_id: str, body: object) -> tuple[Record, bool]:
        w = self.writes
        record = parse_record(body, la=la, today=w.today(), test_numbers_only=w.test_numbers_only, local_id=local_id)
        now = self.clock()
        code, stored = await self.store.put(la, w.change(record, ctx.entry("record.put", None, now)))
        return stored, code == "C"

    async def get(self, ctx: AuditContext, la: str, local_id: str) -> Record:
        validate_local_id(local_id)
        record = await self.store.get(la, local_id)
        if record is None:
            raise NotFound("no such record")
        nhs = record.nhs_number
        await self.audit.append(nhs, ctx.entry("record.read", nhs, self.clock(), localId=local_id))
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
        now = self.clock()
        if not await self.store.erase(la, local_id, lambda nhs: ctx.entry("record.erase", nhs, now, localId=local_id)):
            raise NotFound("no such record")
