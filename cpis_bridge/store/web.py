"""Web view state in Redis: server-side session data and the sign-in failure counters (core's WebSessions and
SignInThrottle ports; the aiohttp-session storage on top of them is the web layer's).

P:web:s:<id>         STRING the session's JSON, expiring after the idle timeout (every request renews it)
P:web:fail:<client>  STRING failed sign-ins from one client address in the current window (INCR, EXPIRE)
P:web:fail:<scope>:<client>  the same for another view (the clinician view's sign-ins and launches: scope "ed";
                             the duty view's per-LA count: scope "la", who the LA)
"""

from __future__ import annotations

from redis.asyncio import Redis

from cpis_bridge.store.keys import Keys


class RedisWebSessions:
    """Session data under the deployment's key prefix; the cookie carries only the random id."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.prefix = keys.prefix

    def _key(self, sid: str) -> str:
        return f"{self.prefix}:web:s:{sid}"

    async def load(self, sid: str) -> bytes | None:
        raw = await self.redis.get(self._key(sid))
        return None if raw is None else (raw if isinstance(raw, bytes) else str(raw).encode())

    async def save(self, sid: str, data: bytes, idle_s: int) -> None:
        await self.redis.set(self._key(sid), data, ex=idle_s)

    async def drop(self, sid: str) -> None:
        await self.redis.delete(self._key(sid))

    async def alive(self, sid: str) -> bool:
        return bool(await self.redis.exists(self._key(sid)))


class SignInLimiter:
    """Failed sign-ins per client address: at most ``limit`` in ``window_s`` seconds. Each ``scope`` (a view) counts
    its own, so one view's failures never lock people out of another."""

    def __init__(self, redis: Redis, keys: Keys, *, limit: int = 5, window_s: int = 900, scope: str = "") -> None:
        self.redis = redis
        self.prefix = keys.prefix
        self.limit = limit
        self.window_s = window_s
        self._scope = f"{scope}:" if scope else ""

    def _key(self, who: str) -> str:
        return f"{self.prefix}:web:fail:{self._scope}{who}"

    async def blocked(self, who: str) -> bool:
        count = await self.redis.get(self._key(who))
        return count is not None and int(count) >= self.limit

    async def failed(self, who: str) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(self._key(who))
            pipe.expire(self._key(who), self.window_s, nx=True)
            count, _ = await pipe.execute()
        return int(count)
