"""Record storage: one LA's records by local id, a child's records by NHS number (uploads' bookkeeping: uploads.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from cpis_bridge.core.access import UNREADABLE, Unreadable, instant
from cpis_bridge.core.clock import utc_now
from cpis_bridge.core.errors import UploadInterrupted
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import Change
from cpis_bridge.core.records import Record
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.replies import Fields
from cpis_bridge.store.scripts import Scripts

_MAX_RETRIES = 6
_NEW_OR_SAME = "*"  # apply_records.lua: "expected current NHS number: none, or the record's own"
_FS = "\x1f"  # separates per-record fields in the payload; never inside an id, a number or orjson output


class RecordIndexMoved(RuntimeError):
    """A record kept moving between NHS numbers while being written; the caller may retry."""


class RedisRecordStore:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts, *, sync_enabled: bool) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.sync_enabled = sync_enabled
        self._tag = keys.tag

    async def get(self, la: str, local_id: str) -> Record | None:
        nhs = cast(str | None, await self.redis.hget(self.keys.la_ids(la), local_id))
        if nhs is None:
            return None
        raw = await self.redis.hget(self.keys.records(self.keys.tag(nhs)), Keys.record_field(la, local_id))
        return None if raw is None else Record.from_compact(la, local_id, orjson.loads(raw))

    async def for_number(self, la: str, nhs: NhsNumber) -> list[Record]:
        return [r for r in await self.all_for_number(nhs) if r.la == la]

    async def all_for_number(self, nhs: NhsNumber) -> list[Record]:
        raw = cast(Fields, await self.redis.hgetall(self.keys.records(self.keys.tag(nhs))))
        return [decode_field(f, v) for f, v in sorted(raw.items())]

    async def get_many(self, la: str, local_ids: Sequence[str]) -> list[Record | None]:
        """Several records of one LA in two round trips (the index, then each child's field)."""
        if not local_ids:
            return []
        numbers = cast(list[str | None], await self.redis.hmget(self.keys.la_ids(la), list(local_ids)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for lid, nhs in zip(local_ids, numbers, strict=True):
                if nhs is not None:
                    pipe.hget(self.keys.records(self._tag(nhs)), Keys.record_field(la, lid))
            raw = iter(await pipe.execute())
        out: list[Record | None] = []
        for lid, nhs in zip(local_ids, numbers, strict=True):
            value = next(raw) if nhs is not None else None
            out.append(None if value is None else Record.from_compact(la, lid, orjson.loads(value)))
        return out

    async def index(self, la: str) -> dict[str, str]:
        return cast(Fields, await self.redis.hgetall(self.keys.la_ids(la)))

    async def count(self, la: str) -> int:
        return int(await self.redis.hlen(self.keys.la_ids(la)))

    async def get_indexed(self, la: str, entries: Sequence[tuple[str, str]]) -> list[Record | None]:
        """Records of one LA from index entries already read (``index``: local id, NHS number) in one round trip. A
        record that moved or went meanwhile is looked up again (``get_many``)."""
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for lid, nhs in entries:
                pipe.hget(self.keys.records(self._tag(nhs)), Keys.record_field(la, lid))
            raw = await pipe.execute()
        out: list[Record | None] = [
            None if v is None else Record.from_compact(la, lid, orjson.loads(v))
            for (lid, _), v in zip(entries, raw, strict=True)
        ]
        missed = [i for i, r in enumerate(out) if r is None]
        if missed:
            for i, r in zip(missed, await self.get_many(la, [entries[i][0] for i in missed]), strict=True):
                out[i] = r
        return out

    async def put(self, la: str, change: Change) -> tuple[str, Record]:
        """One record written, answered as stored (the script returns it: no read-back): its code (C, M or U) and
        the record with its version and update time."""
        [(code, _, stored)] = await self._apply(la, [change], lease=None, answer_stored=True)
        return code, Record.from_compact(la, change.record.local_id, orjson.loads(stored))

    async def apply(self, la: str, changes: Sequence[Change], *, lease: str | None = None) -> list[tuple[str, int]]:
        """Write the changes atomically per call; retries records whose index moved under a concurrent write. With
        ``lease`` (an upload's token) each call first checks that the token still holds the LA's upload lease."""
        return [(code, version) for code, version, _ in await self._apply(la, changes, lease=lease)]

    async def _apply(
        self, la: str, changes: Sequence[Change], *, lease: str | None, answer_stored: bool = False
    ) -> list[tuple[str, int, str]]:
        """``apply``, each record's stored JSON too with ``answer_stored`` (else '').

        The first attempt assumes each record is new or keeps its NHS number (the script checks that, answering
        R otherwise), which saves reading the index first; a retry reads the current number and sends the old
        child's key. Per-record arguments travel as one \\x1f-joined payload (bench/README.md).
        """
        k = self.keys
        per = 3 if answer_stored else 2
        results: list[tuple[str, int, str]] = [("R", 0, "")] * len(changes)
        pending = list(range(len(changes)))
        ids_key = k.la_ids(la)
        for attempt in range(_MAX_RETRIES):
            if not pending:
                return results
            if attempt == 0:
                current: list[str | None] = [_NEW_OR_SAME] * len(pending)
            else:
                ids = [changes[i].record.local_id for i in pending]
                current = cast(list[str | None], await self.redis.hmget(ids_key, ids))
            parts: list[str] = []
            tag, dumps = self._tag, orjson.dumps
            for i, cur in zip(pending, current, strict=True):
                change = changes[i]
                rec = change.record
                nhs = str(rec.nhs_number)
                new_tag = tag(nhs)
                new_hash = k.records(new_tag)
                old_hash = new_hash if not cur or cur in (nhs, _NEW_OR_SAME) else k.records(tag(cur))
                day = change.invisible_from_day
                parts += (
                    rec.local_id,
                    nhs,
                    cur or "",
                    dumps(_stored_fields(rec)).decode(),
                    "" if day is None else str(day),
                    dumps(change.audit).decode(),
                    new_hash,
                    old_hash,
                    k.audit(new_tag),
                )
            try:
                out = await self.scripts.write(
                    self.scripts.apply_records,
                    keys=[ids_key, k.sync_queue, k.sync_schedule, k.la_lock(la)],
                    args=[
                        la,
                        instant(utc_now()),
                        "1" if self.sync_enabled else "0",
                        len(pending),
                        _FS.join(parts),
                        lease or "",
                        "1" if answer_stored else "0",
                    ],
                )
            except ResponseError as exc:
                if str(exc).startswith("LEASE"):
                    raise UploadInterrupted("another process took over this upload", applied=True) from None
                raise
            retry = []
            for j, i in enumerate(pending):
                code, version = out[per * j], int(out[per * j + 1])
                results[i] = (code, version, out[per * j + 2] if answer_stored else "")
                if code == "R":
                    retry.append(i)
            pending = retry
        if pending:
            raise RecordIndexMoved("records kept changing NHS number during the write")
        return results

    async def erase(self, la: str, local_id: str, audit: Callable[[str], Mapping[str, Any]]) -> bool:
        """Remove one record (its audit entry ``audit(nhs)``, from the NHS number the index holds): the index read
        picks the child's keys, the script checks it still holds and does the rest (two round trips)."""
        for _ in range(_MAX_RETRIES):
            nhs = cast(str | None, await self.redis.hget(self.keys.la_ids(la), local_id))
            if nhs is None:
                return False
            tag = self.keys.tag(nhs)
            done = await self.scripts.write(
                self.scripts.erase_record,
                keys=[
                    self.keys.la_ids(la),
                    self.keys.records(tag),
                    self.keys.sync_queue,
                    self.keys.sync_schedule,
                    self.keys.audit(tag),
                ],
                args=[la, local_id, nhs, "1" if self.sync_enabled else "0", orjson.dumps(dict(audit(nhs)))],
            )
            if int(done) >= 0:
                return int(done) == 1
        raise RecordIndexMoved("record kept changing NHS number during erasure")


def _stored_fields(rec: Record) -> dict[str, Any]:
    """:meth:`Record.to_compact` without ``v`` and ``u`` (apply_records.lua appends those): the same keys in the same
    order, built directly."""
    d: dict[str, Any] = {
        "p": rec.plan_type.value,
        "n": str(rec.nhs_number),
        "b": rec.date_of_birth,  # orjson writes a date as YYYY-MM-DD
        "s": rec.start_date,
    }
    if rec.given_name is not None:
        d["g"] = rec.given_name
    if rec.family_name is not None:
        d["f"] = rec.family_name
    if rec.end_date is not None:
        d["e"] = rec.end_date
    if rec.delete_date is not None:
        d["d"] = rec.delete_date
    if rec.expected_delivery_date is not None:
        d["x"] = rec.expected_delivery_date
    if rec.lac_legal_basis is not None:
        d["l"] = rec.lac_legal_basis
    return d


def decode_field(field: str, value: str) -> Record:
    la, _, local_id = field.partition("|")
    return Record.from_compact(la, local_id, orjson.loads(value))


def decode_fields(raw: Mapping[str, str], unreadable: Unreadable) -> list[Record]:
    """A child's stored records in field order, without (but reporting) any that cannot be decoded."""
    records = []
    for field, value in sorted(raw.items()):
        try:
            records.append(decode_field(field, value))
        except UNREADABLE:
            unreadable("record")
    return records
