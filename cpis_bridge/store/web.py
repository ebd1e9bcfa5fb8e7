"""Web view state in Redis: server-side sessions (an aiohttp-session storage) and the sign-in failure counters.

P:web:s:<id>         STRING the session's JSON, expiring after the idle timeout (every request renews it)
P:web:fail:<client>  STRING failed sign-ins from one client address in the current window (INCR, EXPIRE)
P:web:fail:<scope>:<client>  the same for another view (the clinician view's sign-ins and launches: scope "ed";
                             the duty view's per-LA count: scope "la", who the LA)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import orjson
from aiohttp import web
from aiohttp_session import AbstractStorage, Session
from redis.asyncio import Redis

from cpis_bridge.store.keys import Keys


class RedisSessionStorage(AbstractStorage):
    """Sessions held in Redis under the deployment's key prefix; the cookie carries only a random id. The cookie has
    no expiry of its own (it ends with the browser); the Redis key expires ``idle_s`` after the last request."""

    def __init__(
        self, client: Callable[[], tuple[Redis, Keys]], *, cookie_name: str, idle_s: int, secure: bool = True
    ) -> None:
        super().__init__(cookie_name=cookie_name, path="/", secure=secure, httponly=True, samesite="Lax")
        self._client = client  # the app's Redis exists only once it has started
        self.idle_s = idle_s

    def _key(self, sid: str) -> str:
        return f"{self._client()[1].prefix}:web:s:{sid}"

    async def load_session(self, request: web.Request) -> Session:
        sid = self.load_cookie(request)
        if not sid or len(sid) > 64:
            return Session(None, data=None, new=True)
        raw = await self._client()[0].get(self._key(sid))
        if raw is None:
            return Session(None, data=None, new=True)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Session(None, data=None, new=True)
        return Session(sid, data=data, new=False)

    async def save_session(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        redis = self._client()[0]
        old = self.load_cookie(request)
        if session.empty:
            if old and len(old) <= 64:
                await redis.delete(self._key(old))
            self.save_cookie(response, "")
            return
        sid = session.identity
        if sid is None:
            sid = secrets.token_urlsafe(32)
            if old and len(old) <= 64:  # a new session (sign-in) replaces the one the browser held
                await redis.delete(self._key(old))
            self.save_cookie(response, sid)
        data = self._get_session_data(session)
        await redis.set(self._key(str(sid)), orjson.dumps(data), ex=self.idle_s)

    async def alive(self, sid: str) -> bool:
        """Whether the session still exists (a long-lived stream checks now and then that it has not ended)."""
        return bool(await self._client()[0].exists(self._key(sid)))


class SignInLimiter:
    """Failed sign-ins per client address: at most ``limit`` in ``window_s`` seconds. Each ``scope`` (a view) counts
    its own, so one view's failures never lock people out of another."""

    def __init__(
        self, client: Callable[[], tuple[Redis, Keys]], *, limit: int = 5, window_s: int = 900, scope: str = ""
    ) -> None:
        self._client = client
        self.limit = limit
        self.window_s = window_s
        self._scope = f"{scope}:" if scope else ""

    def _key(self, who: str) -> str:
        return f"{self._client()[1].prefix}:web:fail:{self._scope}{who}"

    async def blocked(self, who: str) -> bool:
        count = await self._client()[0].get(self._key(who))
        return count is not None and int(count) >= self.limit

    async def failed(self, who: str) -> int:
        redis = self._client()[0]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(self._key(who))
            pipe.expire(self._key(who), self.window_s, nx=True)
            count, _ = await pipe.execute()
        return int(count)
