"""The Flag sync outbox in Redis: the sync queue stream (group "relays"), its retry zset, the visibility schedule,
dead letters for channel flag-sync, and reading records' current state at send time."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from cpis_bridge.core.ports import SyncItem, WriteResult
from cpis_bridge.core.records import Record
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.replies import Entries, Fields
from cpis_bridge.store.scripts import Scripts

GROUP = "relays"
CHANNEL = "flag-sync"
SEP = "\x1f"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def coalesce(entries: Sequence[tuple[str, dict[str, str]]]) -> tuple[list[SyncItem], list[str]]:
    """Group queue entries by record (oldest first); the newest tombstone wins. Returns items and malformed ids."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    malformed: list[str] = []
    for entry_id, fields in sorted(entries, key=lambda e: _id_key(e[0])):
        la, lid = fields.get("la"), fields.get("lid")
        if not la or lid is None:
            malformed.append(entry_id)
            continue
        queued = int(fields["q"]) if fields.get("q") else _id_key(entry_id)[0]
        group = groups.setdefault((la, lid), {"ids": [], "q": queued, "t": None, "n": 0})
        group["ids"].append(entry_id)
        group["q"] = min(group["q"], queued)
        if fields.get("n"):
            group["n"] = max(group["n"], int(fields["n"]))
        if fields.get("t"):
            group["t"] = fields["t"]
    items = []
    for (la, lid), g in groups.items():
        tomb = None
        if g["t"]:
            try:
                tomb = Record.from_compact(la, lid, orjson.loads(g["t"]))
            except (ValueError, KeyError, TypeError):
                tomb = None
        items.append(SyncItem(la, lid, tuple(g["ids"]), g["q"], tomb, g["n"]))
    return items, malformed


def _stream_messages(resp: Any) -> list[tuple[str, dict[str, str]]]:
    """XREADGROUP's answer in RESP2 (list) or RESP3 (dict) shape, as (id, fields) pairs."""
    out: list[tuple[str, dict[str, str]]] = []
    if not resp:
        return out
    streams = resp.items() if isinstance(resp, dict) else resp
    for _name, messages in streams:
        if (
            isinstance(resp, dict)
            and messages
            and isinstance(messages[0], list)
            and len(messages) == 1
            and messages[0]
            and isinstance(messages[0][0], (list, tuple))
        ):
            messages = messages[0]  # RESP3 nests the entries one level deeper
        for entry_id, fields in messages:
            if fields is not None:
                out.append((entry_id, dict(fields)))
    return out


class RedisSyncQueue:
    """Implements core.ports.SyncQueue."""

    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts, *, reclaim_idle_ms: int = 60_000) -> None:
        self.redis = redis
        self.keys = keys
        self.reclaim_idle_ms = reclaim_idle_ms
        self._schedule = scripts.register("sync_schedule")
        self._due = scripts.register("sync_due")

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.sync_queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- reading ----------------------------------------------------------------------------------------------
    async def read(self, consumer: str, count: int, block_ms: int) -> list[SyncItem]:
        """Entries left by dead consumers first (XAUTOCLAIM), then new ones; coalesced per record."""
        queue = self.keys.sync_queue
        entries: list[tuple[str, dict[str, str]]] = []
        claimed = await self.redis.xautoclaim(queue, GROUP, consumer, self.reclaim_idle_ms, "0-0", count=count)
        for entry_id, fields in claimed[1] if claimed else []:
            if fields is not None:
                entries.append((entry_id, dict(fields)))
        if len(entries) < count:
            resp = await self.redis.xreadgroup(
                GROUP, consumer, {queue: ">"}, count=count - len(entries), block=None if entries else block_ms
            )
            entries.extend(_stream_messages(resp))
        items, malformed = coalesce(entries)
        if malformed:
            await self._ack(malformed)
        return items

    async def current(self, items: Sequence[SyncItem]) -> list[Record | None]:
        """Each item's record as stored now (None when absent): two round trips (HMGET per LA, then HGETs)."""
        if not items:
            return []
        by_la: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_la.setdefault(item.la, []).append(i)
        numbers: list[str | None] = [None] * len(items)
        async with self.redis.pipeline(transaction=False) as pipe:
            for la, idx in by_la.items():
                pipe.hmget(self.keys.la_ids(la), [items[i].local_id for i in idx])
            for idx, found in zip(by_la.values(), await pipe.execute(), strict=True):
                for i, nhs in zip(idx, found, strict=True):
                    numbers[i] = nhs
        async with self.redis.pipeline(transaction=False) as pipe:
            for item, nhs in zip(items, numbers, strict=True):
                if nhs is not None:
                    pipe.hget(self.keys.records(self.keys.tag(nhs)), Keys.record_field(item.la, item.local_id))
            raws = iter(await pipe.execute())
        out: list[Record | None] = []
        for item, nhs in zip(items, numbers, strict=True):
            raw = next(raws) if nhs is not None else None
            out.append(None if raw is None else Record.from_compact(item.la, item.local_id, orjson.loads(raw)))
        return out

    # -- settling ---------------------------------------------------------------------------------------------
    async def _ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.sync_queue, GROUP, *ids)
            pipe.xdel(self.keys.sync_queue, *ids)
            await pipe.execute()

    async def done(self, items: Sequence[SyncItem]) -> None:
        await self._ack([i for item in items for i in item.entry_ids])

    async def defer(self, items: Sequence[SyncItem], due_ms: int | Sequence[int]) -> None:
        """Park the items in the retry zset (one due time, or one each) and acknowledge their entries, in one MULTI
        (nothing lost)."""
        if not items:
            return
        ids = [i for item in items for i in item.entry_ids]
        dues = [due_ms] * len(items) if isinstance(due_ms, int) else list(due_ms)
        mapping = {self.delay_member(item): due for item, due in zip(items, dues, strict=True)}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self.keys.sync_delay, mapping)
            pipe.xack(self.keys.sync_queue, GROUP, *ids)
            pipe.xdel(self.keys.sync_queue, *ids)
            await pipe.execute()

    @staticmethod
    def delay_member(item: SyncItem) -> str:
        tomb = "" if item.tombstone is None else orjson.dumps(item.tombstone.to_compact()).decode()
        return SEP.join((item.la, item.local_id, str(item.queued_ms), str(item.attempts), tomb))

    async def dead(self, item: SyncItem, result: WriteResult) -> None:
        """Dead letter {channel, la, lid, reason, at, outcome} and acknowledge, in one MULTI."""
        letter: dict[FieldT, EncodableT] = {
            "channel": CHANNEL,
            "la": item.la,
            "lid": item.local_id,
            "reason": result.reason or f"HTTP {result.status}",
            "status": str(result.status),
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "outcome": result.operation_outcome or "",
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead_letters, letter)
            pipe.xack(self.keys.sync_queue, GROUP, *item.entry_ids)
            pipe.xdel(self.keys.sync_queue, *item.entry_ids)
            await pipe.execute()

    # -- movers -----------------------------------------------------------------------------------------------
    async def move_due(self, now_ms: int, limit: int = 1000) -> int:
        return int(await self._due(keys=[self.keys.sync_delay, self.keys.sync_queue], args=[now_ms, limit]))

    async def schedule_due(self, today_day: int, limit: int = 1000) -> int:
        return int(await self._schedule(keys=[self.keys.sync_schedule, self.keys.sync_queue], args=[today_day, limit]))

    # -- coordination between processes ---------------------------------------------------------------------
    async def paused_until(self) -> int:
        """Epoch ms until which every process waits before writing to the server (0 = not paused)."""
        raw = await self.redis.get(self.keys.sync_pause)
        return int(raw) if raw else 0

    async def pause_until(self, until_ms: int, now_ms: int) -> None:
        """Pause every process until ``until_ms`` (never shortens a longer pause already set)."""
        if until_ms > await self.paused_until():
            await self.redis.set(self.keys.sync_pause, until_ms, px=max(1, until_ms - now_ms))

    async def lock(self, items: Sequence[SyncItem], owner: str, ttl_ms: int) -> list[bool]:
        """Claim each item's identifier for one conditional write (SET NX PX); False where another process has it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.set(self.keys.sync_lock(Keys.record_field(item.la, item.local_id)), owner, nx=True, px=ttl_ms)
            return [bool(x) for x in await pipe.execute()]

    async def unlock(self, items: Sequence[SyncItem]) -> None:
        if items:
            await self.redis.delete(*(self.keys.sync_lock(Keys.record_field(i.la, i.local_id)) for i in items))

    # -- observation ------------------------------------------------------------------------------------------
    async def stats(self, now_ms: int) -> tuple[int, float]:
        """(entries waiting, age in seconds of the oldest), queue and retry zset together."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.sync_queue)
            pipe.zcard(self.keys.sync_delay)
            pipe.xrange(self.keys.sync_queue, count=1)
            pipe.zrange(self.keys.sync_delay, 0, 0)
            qlen, dlen, first, delayed = await pipe.execute()
        oldest = now_ms
        if first:
            oldest = min(oldest, _id_key(first[0][0])[0])
        if delayed:
            parts = delayed[0].split(SEP)
            if len(parts) >= 3 and parts[2].isdigit():
                oldest = min(oldest, int(parts[2]))
        return int(qlen) + int(dlen), max(0.0, (now_ms - oldest) / 1000)

    async def dead_letters(self, count: int = 1000) -> list[dict[str, str]]:
        rows = cast(Entries, await self.redis.xrange(self.keys.dead_letters, count=count))
        return [dict(f) for _id, f in rows if f.get("channel") == CHANNEL]

    # -- whole store (reconcile) ------------------------------------------------------------------------------
    async def all_records(self, batch: int = 500) -> AsyncIterator[list[Record]]:
        """Every stored record, LA by LA, in batches."""
        suffix_len = len(":ids")
        head = len(self.keys.la_ids("")) - suffix_len
        async for key in self.redis.scan_iter(match=self.keys.pattern("la:*:ids"), count=500):
            la = key[head:-suffix_len]
            cursor = 0
            while True:
                cursor, chunk = cast(tuple[int, Fields], await self.redis.hscan(key, cursor, count=batch))
                pairs = list(chunk.items())
                if pairs:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for lid, nhs in pairs:
                            pipe.hget(self.keys.records(self.keys.tag(nhs)), Keys.record_field(la, lid))
                        raws = await pipe.execute()
                    yield [
                        Record.from_compact(la, lid, orjson.loads(raw))
                        for (lid, _nhs), raw in zip(pairs, raws, strict=True)
                        if raw is not None
                    ]
                if cursor == 0:
                    break
