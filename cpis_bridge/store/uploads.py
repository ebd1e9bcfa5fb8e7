"""Upload bookkeeping in Redis: applied sequences and their reports, the per-LA upload lease and its journal (the
file of the upload in progress, kept until it is completed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import cast

from redis.asyncio import Redis

from cpis_bridge.store.keys import Keys
from cpis_bridge.store.scripts import Scripts


class RedisUploadStore:
    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self._scripts = scripts or Scripts(redis)
        self._script = self._scripts.register("upload_lease")

    async def _step(self, la: str, step: str, token: str, *args: str | bytes | int) -> bool:
        """One journal step (push, commit, finish, ...), confirmed by replicas when configured."""
        k = self.keys
        keys = [k.la_lock(la), k.la_journal(la), k.la_journal_body(la), k.la_uploads(la), k.la_sequence(la)]
        return int(await self._scripts.write(self._script, keys=keys, args=[step, token, *args])) == 1

    async def upload_report(self, la: str, sequence: int) -> bytes | None:
        raw = cast(str | None, await self.redis.hget(self.keys.la_uploads(la), str(sequence)))
        return None if raw is None else raw.encode()

    async def last_sequence(self, la: str) -> int | None:
        raw = await self.redis.get(self.keys.la_sequence(la))
        return None if raw is None else int(raw)

    async def acquire(self, la: str, token: str, ttl_ms: int) -> str | None:
        key = self.keys.la_lock(la)
        for _ in range(3):  # the holder may expire between SET and GET
            if await self.redis.set(key, token, nx=True, px=ttl_ms):
                return None
            holder = cast(str | None, await self.redis.get(key))
            if holder is not None:
                return holder
        return ""

    async def renew(self, la: str, token: str, ttl_ms: int) -> bool:
        return await self._step(la, "renew", token, ttl_ms)

    async def release(self, la: str, token: str) -> None:
        await self._step(la, "release", token)

    async def journal(self, la: str) -> bytes | None:
        raw = cast(str | None, await self.redis.get(self.keys.la_journal(la)))
        return None if raw is None else raw.encode()

    async def journalled(self, las: Sequence[str]) -> list[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for la in las:
                pipe.exists(self.keys.la_journal(la))
            found = await pipe.execute()
        return [la for la, n in zip(las, found, strict=True) if n]

    async def push_body(self, la: str, token: str, chunk: bytes, *, first: bool) -> bool:
        return await self._step(la, "push", token, chunk, "1" if first else "0")

    async def read_body(self, la: str) -> AsyncIterator[bytes]:
        key = self.keys.la_journal_body(la)
        # One chunk per call (a whole body at once could be 128 MiB), undecoded: a chunk may end inside a character.
        for i in range(int(await self.redis.llen(key))):
            chunk = await self.redis.execute_command("LINDEX", key, i, NEVER_DECODE=True)
            if chunk is not None:
                yield bytes(chunk)

    async def commit(self, la: str, token: str, entry: bytes) -> bool:
        return await self._step(la, "commit", token, entry)

    async def finish(self, la: str, token: str, sequence: int, report: bytes | None) -> bool:
        return await self._step(la, "finish", token, str(sequence), b"" if report is None else report)
