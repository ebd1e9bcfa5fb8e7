"""Retention and subject access in Redis: SCAN-based, batched purges (Lua where a check and a delete must be one
step) and the gathering of everything held for one NHS number."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from cpis_bridge.core.access import Unreadable, ignore_unreadable, readable_accesses
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import InboxItem, SubjectData
from cpis_bridge.core.records import Record
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.records import decode_field, decode_fields
from cpis_bridge.store.replies import Entries
from cpis_bridge.store.scripts import Scripts

SCAN_COUNT = 1000
AUDIT_TRIM_STEP = 1000
READ_BATCH = 1000


class RedisRetentionStore:
    def __init__(
        self, redis: Redis, keys: Keys, scripts: Scripts, *, unreadable: Unreadable = ignore_unreadable
    ) -> None:
        self.redis = redis
        self.unreadable = unreadable
        self.keys = keys
        self._records = scripts.register("retention_records")
        self._accesses = scripts.register("retention_accesses")
        self._inbox = scripts.register("retention_inbox")
        self._audit = scripts.register("retention_audit")

    # -- scanning -----------------------------------------------------------------------------------------------
    async def _scan(self, suffix: str) -> AsyncIterator[list[str]]:
        """Keys matching ``prefix:suffix`` in batches (SCAN: never blocks the server for long)."""
        batch: list[str] = []
        async for key in self.redis.scan_iter(match=self.keys.pattern(suffix), count=SCAN_COUNT):
            batch.append(key)
            if len(batch) >= SCAN_COUNT:
                yield batch
                batch = []
        if batch:
            yield batch

    async def child_records(self, batch: int = 500) -> AsyncIterator[list[Record]]:
        out: list[Record] = []
        async for keys in self._scan("c:*:r"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                hashes = await pipe.execute()
            for raw in hashes:
                for field, value in raw.items():
                    out.append(decode_field(field, value))
                    if len(out) >= batch:
                        yield out
                        out = []
        if out:
            yield out

    # -- purging ------------------------------------------------------------------------------------------------
    async def delete_records(self, records: Sequence[Record], audit: Mapping[str, Any]) -> int:
        if not records:
            return 0
        k = self.keys
        keys = [k.sync_schedule]
        args: list[Any] = [len(records), orjson.dumps(dict(audit))]
        for rec in records:
            tag = k.tag(str(rec.nhs_number))
            keys += [k.records(tag), k.la_ids(rec.la), k.audit(tag)]
            args += [Keys.record_field(rec.la, rec.local_id), rec.local_id, str(rec.nhs_number), rec.version]
        return int(await self._records(keys=keys, args=args))

    async def trim_accesses(self, before_ms: int) -> int:
        removed = 0
        async for keys in self._scan("c:*:a"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    await self._accesses(keys=[key], args=[before_ms], client=pipe)
                removed += sum(int(n) for n in await pipe.execute())
        return removed

    async def trim_acknowledged_inbox(self, before_ms: int) -> int:
        removed = 0
        async for ack_keys in self._scan("inbox:*:ack"):
            for ack_key in ack_keys:
                stream = ack_key.removesuffix(":ack")
                async for ids in self._sscan(ack_key):
                    old = [i for i in ids if _stream_ms(i) < before_ms]
                    if old:
                        removed += int(await self._inbox(keys=[stream, ack_key, stream + ":ackby"], args=old))
        return removed

    async def _sscan(self, key: str) -> AsyncIterator[list[str]]:
        cursor: int = 0
        while True:
            cursor, members = cast(tuple[int, list[str]], await self.redis.sscan(key, cursor, count=READ_BATCH))
            if members:
                yield list(members)
            if cursor == 0:
                return

    async def trim_audit(self, before: str) -> int:
        removed = 0

        async def trim(key: str) -> int:
            total = 0
            while True:
                n = int(await self._audit(keys=[key], args=[before, AUDIT_TRIM_STEP]))
                total += n
                if n < AUDIT_TRIM_STEP:
                    return total

        async for keys in self._scan("c:*:au"):
            for key in keys:
                removed += await trim(key)
        removed += await trim(self.keys.system_audit)
        return removed

    async def audit_system(self, entry: Mapping[str, Any]) -> None:
        await self.redis.lpush(self.keys.system_audit, orjson.dumps(dict(entry)))

    # -- subject access -----------------------------------------------------------------------------------------
    async def subject(self, nhs: NhsNumber) -> SubjectData:
        k = self.keys
        tag = k.tag(nhs)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.records(tag))
            pipe.lrange(k.accesses(tag), 0, -1)
            pipe.lrange(k.audit(tag), 0, -1)
            raw_records, raw_accesses, raw_audit = await pipe.execute()
        records = decode_fields(raw_records, self.unreadable)
        accesses = readable_accesses(raw_accesses, tag, self.unreadable)
        encounters: dict[str, dict[str, Any]] = {}
        if accesses:
            found = await self.redis.mget([k.encounter(aid) for aid, _ in accesses])
            for (aid, _), raw in zip(accesses, found, strict=True):
                if raw is not None:
                    encounters[aid] = orjson.loads(raw)
        return SubjectData(
            tag=tag,
            records=records,
            accesses=accesses,
            encounters=encounters,
            inbox=await self._inbox_for(tag),
            audit=[orjson.loads(x) for x in raw_audit],
            system_audit=await self._system_audit_for(tag),
        )

    async def _inbox_for(self, tag: str) -> list[InboxItem]:
        items: list[InboxItem] = []
        inbox_prefix = self.keys.inbox("")
        async for keys in self._scan("inbox:*"):
            for stream in keys:
                la = stream.removeprefix(inbox_prefix)
                if ":" in la:  # the LA's ack set and index, not its stream
                    continue
                ack_key = self.keys.inbox_acks(la)
                start = "-"
                while True:
                    entries = cast(Entries, await self.redis.xrange(stream, min=start, max="+", count=READ_BATCH))
                    mine = [(eid, fields) for eid, fields in entries if fields.get("tag") == tag]
                    if mine:
                        acked = await self.redis.smismember(ack_key, [eid for eid, _ in mine])
                        items += [InboxItem(la, eid, bool(a), dict(f)) for (eid, f), a in zip(mine, acked, strict=True)]
                    if len(entries) < READ_BATCH:
                        break
                    start = "(" + entries[-1][0]
        return items

    async def _system_audit_for(self, tag: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        needle = tag.encode()
        start = 0
        while True:
            raw = cast(list[str], await self.redis.lrange(self.keys.system_audit, start, start + READ_BATCH - 1))
            for text in raw:
                if needle in text.encode():
                    entry = orjson.loads(text)
                    if _mentions(entry, tag):
                        out.append(entry)
            if len(raw) < READ_BATCH:
                return out
            start += READ_BATCH


def _mentions(entry: Any, tag: str) -> bool:
    detail = entry.get("detail") if isinstance(entry, dict) else None
    return isinstance(detail, dict) and tag in (detail.get("subjectTag"), detail.get("tag"))


def _stream_ms(entry_id: str) -> int:
    ms, _, _ = entry_id.partition("-")
    try:
        return int(ms)
    except ValueError:
        return 1 << 62
