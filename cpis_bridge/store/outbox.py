"""The notification outbox in Redis: the delivery queue stream read through the "relays" consumer group, reclaim
of abandoned entries (XAUTOCLAIM), the delay zset of retries (settle.lua / promote.lua), entries held aside per
endpoint while it cannot take them (settle.lua / release.lua), dead letters, pauses.

Queue entry fields: la, ref (inbox entry id); retries add ch (the one channel still owed), n (failed attempts),
t0 (epoch ms first queued) and c4 (epoch ms of the first of an unbroken run of 4xx, 0 if none).
Dead-letter entry fields (keys.dead_letters, shared with the Flag sync): channel (webhook | fhir | inbox |
flag-sync), la, reason, status, at (epoch ms), attempts, and ref + t0 [+ detail] for notifications or lid [+ t]
for sync.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from cpis_bridge.core.ports import DeadLetter, QueueEntry
from cpis_bridge.store.connection import Lane
from cpis_bridge.store.inbox import fill_recent
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.scripts import Scripts, run_scripts

GROUP = "relays"
SETTLE_LINGER_S = 0.003
SCAN_CAP = 50_000  # stats read at most this many entries per structure (bounded cost on a huge backlog)
PAGE = 1000
CHANNELS = ("webhook", "fhir", "inbox", "flag-sync")


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def to_entry(entry_id: str, f: Mapping[str, str]) -> QueueEntry:
    """The queue entry; one whose stored fields cannot be read comes back with ``problem`` set, so that the relay
    dead-letters it instead of failing the whole read (and every entry read with it) again and again."""
    try:
        return QueueEntry(
            id=entry_id,
            la=f.get("la", ""),
            ref=f.get("ref", ""),
            channel=f.get("ch") or None,
            attempt=int(f.get("n") or 0),
            first_ms=int(f.get("t0") or entry_ms(entry_id)),
            client_error_since_ms=int(f.get("c4") or 0),
            access_id=f.get("aid", ""),
        )
    except ValueError:
        return QueueEntry(
            id=entry_id,
            la=f.get("la", ""),
            ref=f.get("ref", ""),
            channel=f.get("ch") or None,
            first_ms=entry_ms(entry_id),
            problem="queue entry: unreadable field",
        )


def member(entry: QueueEntry) -> str:
    """A delay-zset member: the stream fields to re-add (unique per notification, channel and attempt)."""
    fields = [
        "la",
        entry.la,
        "ref",
        entry.ref,
        "ch",
        entry.channel or "",
        "n",
        str(entry.attempt),
        "t0",
        str(entry.first_ms),
        "c4",
        str(entry.client_error_since_ms),
        "aid",
        entry.access_id,
    ]
    return orjson.dumps(fields).decode()


class RedisOutbox:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self.lane = Lane(redis)  # the relay's per-batch reads and settles
        self._settle = scripts.register("settle")
        self._replicas = scripts.replicas
        self._promote = scripts.register("promote")
        self._release = scripts.register("release")
        self._recent = scripts.register("inbox_recent")
        self._batch: list[tuple[list[str], list[Any], asyncio.Future[bool]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def ensure_group(self) -> None:
        try:
            # From the start of the stream: entries queued before any relay ever ran are delivered too.
            await self.redis.xgroup_create(self.keys.notify_queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def forget(self, consumer: str) -> None:
        """Remove a stopped consumer from the group, but only when it holds nothing (its entries stay claimable)."""
        try:
            pending = await self.redis.xpending_range(self.keys.notify_queue, GROUP, "-", "+", 1, consumername=consumer)
            if not pending:
                await self.redis.xgroup_delconsumer(self.keys.notify_queue, GROUP, consumer)
        except ResponseError:
            pass

    async def read(self, consumer: str, count: int, block_ms: int) -> list[QueueEntry]:
        try:
            out = await self.lane.call(
                "XREADGROUP",
                "GROUP",
                GROUP,
                consumer,
                "COUNT",
                max(count, 1),
                "BLOCK",
                block_ms,
                "STREAMS",
                self.keys.notify_queue,
                ">",
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        if not out:
            return []
        streams = out.values() if isinstance(out, dict) else [s[1] for s in out]  # RESP3 map or RESP2 list
        return [to_entry(i, pairs(f)) for rows in streams for i, f in rows if f]

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[QueueEntry]:
        try:
            out = await self.redis.xautoclaim(self.keys.notify_queue, GROUP, consumer, min_idle_ms, "0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        entries = [to_entry(i, f) for i, f in out[1] if f]
        gone = [i for i, f in out[1] if not f]  # deleted while pending: nothing to deliver
        if gone:
            await self.redis.xack(self.keys.notify_queue, GROUP, *gone)
        return entries

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries this consumer is still handling (XCLAIM JUSTID, min idle 0), so that
        XAUTOCLAIM never takes them as abandoned while an attempt may still be running. An id no longer pending
        (settled meanwhile) is ignored by Redis."""
        for start in range(0, len(entry_ids), PAGE):
            page = entry_ids[start : start + PAGE]
            await self.redis.xclaim(self.keys.notify_queue, GROUP, consumer, 0, list(page), justid=True)

    async def aclose(self) -> None:
        await self.lane.aclose()

    async def load(self, entries: Sequence[QueueEntry]) -> list[dict[str, str] | Exception | None]:
        """Each entry's notification body. With CPIS_REDIS_MIN_REPLICAS the read ends with the fence and WAIT: only
        what replicas hold is delivered, so a notification never reaches an LA for an access a failover then loses
        (unconfirmed: the entries stay pending and are reclaimed later)."""
        replicas = self._replicas
        found = await self.lane.pipeline(
            [("XRANGE", self.keys.inbox(e.la), e.ref, e.ref) for e in entries] + replicas.commands()
        )
        if replicas.enabled:
            replicas.check(found)
            found = found[: len(entries)]
        out: list[dict[str, str] | Exception | None] = []
        for rows in found:
            if isinstance(rows, Exception):
                out.append(rows)
                continue
            flat = rows[0][1] if rows else None  # raw reply: [[id, [field, value, ...]]]
            out.append(pairs(flat) if flat is not None else None)
        await fill_recent(self.redis, self.keys, self._recent, out)  # an unreadable one fails alone
        return out

    async def settle(
        self,
        entry: QueueEntry,
        *,
        notification_id: str | None,
        retries: Sequence[tuple[QueueEntry, int]] = (),
        dead: Sequence[DeadLetter] = (),
        holds: Sequence[QueueEntry] = (),
    ) -> bool:
        k = self.keys
        args: list[Any] = [GROUP, entry.id, notification_id or "", entry.ref, len(retries)]
        for retry, due in retries:
            args += [due, member(retry)]
        args.append(len(dead))
        now = int(time.time() * 1000)
        for d in dead:
            fields = [
                "channel",
                d.channel,
                "la",
                entry.la,
                "ref",
                entry.ref,
                "reason",
                d.reason,
                "status",
                "" if d.status is None else str(d.status),
                "at",
                str(now),
                "attempts",
                str(entry.attempt + 1),
                "t0",
                str(entry.first_ms),
            ]
            if d.detail:
                fields += ["detail", d.detail]
            args += [len(fields) // 2, *fields]
        keys = [k.notify_queue, k.notify_delay, k.dead_letters, k.inbox_index(entry.la), k.notify_held_index]
        args.append(len(holds))
        for held in holds:
            channel = held.channel or ""
            keys.append(k.notify_held(held.la, channel))
            args += [held.first_ms, member(held), f"{channel}:{held.la}"]
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._batch.append((keys, args, fut))
        if len(self._batch) == 1:
            # Linger a moment: settles finishing within it share one round trip (and one fsync).
            asyncio.get_running_loop().call_later(SETTLE_LINGER_S, self._flush_soon)
        return await fut

    def _flush_soon(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.ensure_future(self._flush(batch))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _flush(self, batch: list[tuple[list[str], list[Any], asyncio.Future[bool]]]) -> None:
        """Settles made within SETTLE_LINGER_S go to Redis in one pipeline: one round trip (and, with
        appendfsync always, one fsync) for many deliveries. Each script stays atomic on its own."""
        try:
            results = await self._run_settles([(keys, args) for keys, args, _ in batch])
        except Exception as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, _, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(bool(result))

    async def _run_settles(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """EVALSHA each settle in one pipeline (redis-py's Script-in-pipeline costs a SCRIPT EXISTS round trip on
        every execute; store/scripts.run_scripts sends EVAL after NOSCRIPT). With CPIS_REDIS_MIN_REPLICAS the pipeline
        ends with the fence and WAIT (store/replicas.py): the settles count once replicas hold them."""
        replicas = self._replicas
        return await run_scripts(self.lane.pipeline, self._settle, calls, replicas.commands(), replicas.check)

    async def promote(self, now_ms: int, limit: int) -> int:
        return int(await self._promote(keys=[self.keys.notify_delay, self.keys.notify_queue], args=[now_ms, limit]))

    async def held_endpoints(self) -> list[tuple[str, str]]:
        return await held_endpoints(self.redis, self.keys)

    async def release(self, la: str, channel: str, count: int, expired_before_ms: int) -> int:
        k = self.keys
        return int(
            await self._release(
                keys=[k.notify_held(la, channel), k.notify_queue, k.notify_held_index],
                args=[max(count, 0), expired_before_ms, f"{channel}:{la}", 500],
            )
        )

    async def pause(self, la: str, channel: str, until_ms: int) -> None:
        ttl = max(until_ms - int(time.time() * 1000), 1)
        await self.redis.set(self.keys.delivery_pause(la, channel), until_ms, px=ttl)

    async def paused_until(self, endpoints: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        values = await self.redis.mget([self.keys.delivery_pause(la, ch) for la, ch in endpoints])
        return {ep: int(v) for ep, v in zip(endpoints, values, strict=True) if v}


async def held_endpoints(redis: Redis, keys: Keys) -> list[tuple[str, str]]:
    """(la, channel) of every endpoint with entries set aside."""
    names = cast(set[str], await redis.smembers(keys.notify_held_index))
    out = []
    for name in sorted(names):
        channel, _, la = name.partition(":")
        out.append((la, channel))
    return out


def pairs(flat: Sequence[str]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}
