"""What the delivery admin reads and repairs (core.ports.DeliveryLedger): per channel counts of queued, retrying
(delayed or held for their endpoint) and dead-lettered notifications with the age of the oldest undelivered one
(the pull inbox: unacknowledged entries; Flag sync: its queue), and dead letters put back on their queue. The relay's
queue itself is outbox.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from cpis_bridge.core.ports import ChannelStats
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.outbox import CHANNELS, PAGE, SCAN_CAP, entry_ms, held_endpoints, pairs, to_entry
from cpis_bridge.store.replies import Entries
from cpis_bridge.store.scripts import Scripts


class RedisDeliveryLedger:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self._requeue = scripts.register("requeue_dead")

    async def requeue_dead(self, dead_id: str, now_ms: int) -> bool:
        k = self.keys
        out = await self._requeue(keys=[k.dead_letters, k.notify_queue, k.sync_queue], args=[dead_id, now_ms])
        return bool(out)

    async def stats(self, channels_of: Mapping[str, Sequence[str]], now_ms: int) -> dict[str, ChannelStats]:
        """Per channel: queued entries (pending), waiting retries (retrying), dead letters, and the age of the oldest
        undelivered one. The pull inbox counts notifications the LA has not acknowledged yet."""
        k = self.keys
        pending = dict.fromkeys(CHANNELS, 0)
        retrying = dict.fromkeys(CHANNELS, 0)
        dead = dict.fromkeys(CHANNELS, 0)
        oldest: dict[str, int] = {}

        def seen(ch: str, t0: int) -> None:
            if ch not in oldest or t0 < oldest[ch]:
                oldest[ch] = t0

        held = await held_endpoints(self.redis, self.keys)
        async with self.redis.pipeline(transaction=True) as pipe:
            # One snapshot of the first page of every structure an entry moves between (queue, retries, held, dead
            # letters), so that a small backlog is counted exactly; a larger one is paged on after it.
            pipe.xrange(k.notify_queue, "-", "+", count=PAGE)
            pipe.zrange(k.notify_delay, 0, SCAN_CAP - 1)
            pipe.xrange(k.dead_letters, "-", "+", count=PAGE)
            for la, ch in held:
                pipe.zcard(k.notify_held(la, ch))
                pipe.zrange(k.notify_held(la, ch), 0, 0, withscores=True)
            queued, delayed, letters, *held_parts = await pipe.execute()
        for eid, f in await self._more(k.notify_queue, queued):
            e = to_entry(eid, f)
            for ch in [e.channel] if e.channel else channels_of.get(e.la, ()):
                pending[ch] += 1
                seen(ch, e.first_ms)
        for raw in delayed:
            f = pairs(orjson.loads(raw))
            ch = f.get("ch") or "webhook"
            retrying[ch] = retrying.get(ch, 0) + 1
            seen(ch, int(f.get("t0") or now_ms))
        for (_, ch), count, first in zip(held, held_parts[::2], held_parts[1::2], strict=True):
            retrying[ch] = retrying.get(ch, 0) + int(count)  # waiting for their endpoint: counted as retrying
            if first:
                seen(ch, int(first[0][1]))
        for _, f in await self._more(k.dead_letters, letters):
            ch = f.get("channel", "webhook")
            dead[ch] = dead.get(ch, 0) + 1
        # Flag sync (its relay is built elsewhere): queue length, delay zset size, oldest queued entry.
        pending["flag-sync"] = int(await self.redis.xlen(k.sync_queue))
        retrying["flag-sync"] = int(await self.redis.zcard(k.sync_delay))
        first = cast(Entries, await self.redis.xrange(k.sync_queue, "-", "+", count=1))
        if first:
            seen("flag-sync", entry_ms(first[0][0]))
        for la in channels_of:
            count, first_ms = await self._unacknowledged(la)
            pending["inbox"] += count
            if first_ms is not None:
                seen("inbox", first_ms)
        return {
            ch: ChannelStats(
                pending[ch],
                retrying.get(ch, 0),
                dead.get(ch, 0),
                max(now_ms - oldest[ch], 0) / 1000 if ch in oldest else 0.0,
            )
            for ch in CHANNELS
        }

    async def _unacknowledged(self, la: str) -> tuple[int, int | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.inbox(la))
            pipe.scard(self.keys.inbox_acks(la))
            total, acked = await pipe.execute()
        count = max(int(total) - int(acked), 0)
        if count == 0:
            return 0, None
        start = "-"
        scanned, step = 0, 8  # the oldest entries are usually unacknowledged: read few bodies (~2 KB each) first
        while scanned < SCAN_CAP:
            rows = cast(Entries, await self.redis.xrange(self.keys.inbox(la), start, "+", count=step))
            step = min(step * 4, 500)
            if not rows:
                break
            flags = await self.redis.smismember(self.keys.inbox_acks(la), [r[0] for r in rows])
            for (eid, _), flag in zip(rows, flags, strict=True):
                if not flag:
                    return count, entry_ms(eid)
            scanned += len(rows)
            start = "(" + rows[-1][0]
        return count, None

    async def _more(self, key: str, first: Sequence[Any]) -> list[tuple[str, dict[str, str]]]:
        """A stream's entries: the first page already read, then the rest page by page (up to SCAN_CAP)."""
        out = [(i, dict(f)) for i, f in first]
        rows = first
        while len(rows) == PAGE and len(out) < SCAN_CAP:
            rows = cast(Entries, await self.redis.xrange(key, "(" + out[-1][0], "+", count=PAGE))
            out += [(i, dict(f)) for i, f in rows]
        return out
