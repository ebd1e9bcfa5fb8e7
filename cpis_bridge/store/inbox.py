"""Each LA's pull inbox in Redis: the inbox stream written by access.lua, its acknowledgements, the index from
notification id to inbox entry (written by access.lua; rebuilt here by scanning when an id is not indexed yet), and
reading an entry's recent accesses from the child's access log (fill_recent)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, cast

from redis.asyncio import Redis

from cpis_bridge.core.access import Access, notification_id
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.replies import Entries, Streams
from cpis_bridge.store.scripts import Scripts

SCAN_CHUNK = 500
LAST_ENTRY_ID = f"{2**64 - 1}-{2**64 - 1}"


async def fill_recent(redis: Redis, keys: Keys, script: Any, loaded: list[Any]) -> None:
    """Give each inbox entry (fields as access.lua wrote them: ``tag``, ``acc`` and ``n``, the child's access-log
    length right after the access) its ``recent`` field, read by inbox_recent.lua, all in one round trip. ``loaded``
    may hold None (an entry not found) and exceptions (a read that failed), left as they are; an entry whose recent
    accesses cannot be read gets the exception in its place instead of failing the others. ``script`` is
    ``Scripts.register("inbox_recent")``."""
    todo = [i for i, f in enumerate(loaded) if isinstance(f, dict)]
    if not todo:
        return
    sent: list[int] = []
    async with redis.pipeline(transaction=False) as pipe:
        for i in todo:
            f = loaded[i]
            try:
                await script(keys=[keys.accesses(f["tag"])], args=[f["acc"], f["n"]], client=pipe)
            except KeyError as exc:
                loaded[i] = exc
                continue
            sent.append(i)
        results = await pipe.execute(raise_on_error=False) if sent else []
    for i, recent in zip(sent, results, strict=True):
        if isinstance(recent, Exception):
            loaded[i] = recent
        else:
            loaded[i]["recent"] = recent


async def _filled(redis: Redis, keys: Keys, script: Any, entries: Sequence[MutableMapping[str, str]]) -> None:
    """:func:`fill_recent` for the inbox's reads: an entry missing a field is left without recent accesses (the
    rendering reads it as none), a failed script call fails the read."""
    loaded: list[Any] = list(entries)
    await fill_recent(redis, keys, script, loaded)
    for f in loaded:
        if isinstance(f, Exception) and not isinstance(f, KeyError):
            raise f


class RedisInbox:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self._recent = scripts.register("inbox_recent")
        self._filter = scripts.register("inbox_filter")

    async def page(self, la: str, after: str | None, limit: int) -> list[tuple[str, dict[str, str], bool]]:
        """Up to ``limit`` entries after the entry id ``after`` (oldest first), each with its acknowledged flag."""
        if after == LAST_ENTRY_ID:
            return []  # nothing can follow it, and Redis refuses an exclusive range from it
        rows = cast(
            Entries, await self.redis.xrange(self.keys.inbox(la), "(" + after if after else "-", "+", count=limit)
        )
        if not rows:
            return []
        flags = await self.redis.smismember(self.keys.inbox_acks(la), [r[0] for r in rows])
        out = [(eid, dict(f), bool(flag)) for (eid, f), flag in zip(rows, flags, strict=True)]
        await _filled(self.redis, self.keys, self._recent, [f for _, f, _ in out])
        return out

    async def find(self, la: str, nid: str) -> str | None:
        """The inbox entry id of notification ``nid`` in this LA's inbox, or None."""
        ref = cast(str | None, await self.redis.hget(self.keys.inbox_index(la), nid))
        if ref is not None:
            return ref
        end = "+"
        while True:  # newest first: an id not indexed yet is most likely a recent one
            rows = cast(Entries, await self.redis.xrevrange(self.keys.inbox(la), end, "-", count=SCAN_CHUNK))
            if not rows:
                return None
            for eid, f in rows:
                try:
                    aid = Access.decode(f["acc"]).access_id(f["tag"])
                except (KeyError, ValueError):
                    continue
                if notification_id(aid, la) == nid:
                    await self.redis.hset(self.keys.inbox_index(la), nid, eid)
                    return str(eid)
            end = "(" + rows[-1][0]

    async def newest(
        self, la: str, before: str | None, oldest: str | None, count: int
    ) -> list[tuple[str, dict[str, str], bool]]:
        """Up to ``count`` entries, newest first, older than the entry id ``before`` (None: from the newest) and not
        older than the id ``oldest``, each with its acknowledged flag; without their recent accesses (a list needs
        none of them)."""
        rows = cast(
            Entries,
            await self.redis.xrevrange(
                self.keys.inbox(la), "(" + before if before else "+", oldest or "-", count=count
            ),
        )
        if not rows:
            return []
        flags = await self.redis.smismember(self.keys.inbox_acks(la), [r[0] for r in rows])
        return [(eid, dict(f), bool(flag)) for (eid, f), flag in zip(rows, flags, strict=True)]

    async def matching(
        self,
        la: str,
        before: str | None,
        oldest: str | None,
        want: int,
        budget: int,
        care_setting: str | None,
        acknowledged: bool | None,
    ) -> tuple[list[tuple[str, dict[str, str], bool]], str | None, int]:
        """Like :meth:`newest` filtered inside Redis (inbox_filter.lua, one round trip): up to ``want`` entries from
        ``care_setting`` and with the ``acknowledged`` flag (None: any), reading at most ``budget`` entries. With the
        last entry id read (None when the range ran out) and how many were read."""
        kept, last, read = await self._filter(
            keys=[self.keys.inbox(la), self.keys.inbox_acks(la)],
            args=[
                "(" + before if before else "+",
                oldest or "-",
                want,
                budget,
                care_setting or "",
                "" if acknowledged is None else int(acknowledged),
            ],
        )
        rows = [(str(eid), dict(zip(f[::2], f[1::2], strict=True)), bool(flag)) for eid, f, flag in kept]
        return rows, (str(last) or None), int(read)

    async def entry(self, la: str, ref: str) -> tuple[dict[str, str], str | None] | None:
        """One entry with its recent accesses, and who acknowledged it when (``"<ms>\x1f<subject>\x1f<name>"``;
        ``""`` for an acknowledgement that recorded nobody, None when not acknowledged)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(self.keys.inbox(la), ref, ref)
            pipe.sismember(self.keys.inbox_acks(la), ref)
            pipe.hget(self.keys.inbox_acks_by(la), ref)
            rows, acked, by = await pipe.execute()
        if not rows:
            return None
        fields = dict(rows[0][1])
        await _filled(self.redis, self.keys, self._recent, [fields])
        return fields, (by or "") if acked else None

    async def heads(self, las: Sequence[str]) -> dict[str, str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for la in las:
                pipe.xrevrange(self.keys.inbox(la), count=1)
            tops = await pipe.execute()
        return {la: top[0][0] if top else "0-0" for la, top in zip(las, tops, strict=True)}

    async def tail(self, after: Mapping[str, str], block_ms: int) -> list[tuple[str, str, dict[str, str]]]:
        """One XREAD over every LA's inbox (a single connection serves every watcher of the process)."""
        prefix = self.keys.inbox("")
        got = cast(
            Streams | None,
            await self.redis.xread({self.keys.inbox(la): eid for la, eid in after.items()}, count=500, block=block_ms),
        )
        return [(stream.removeprefix(prefix), eid, dict(f)) for stream, rows in got or [] for eid, f in rows]

    async def ack(self, la: str, ref: str, by: str = "") -> None:
        """Mark the entry acknowledged; ``by`` (who and when) is kept beside it unless it was acknowledged before."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.keys.inbox_acks(la), ref)
            if by:
                pipe.hsetnx(self.keys.inbox_acks_by(la), ref, by)
            await pipe.execute()
