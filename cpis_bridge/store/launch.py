"""The clinician view's launch contexts in Redis: the opaque ``appContext`` a CDS card's SMART link carries, naming
the look-up it came from (child, care setting, user), kept for a short time and taken at most once.

P:web:launch:<id>    STRING the context's JSON (NHS number inside, never in the id), expiring after ``ttl_s``
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import orjson
from redis.asyncio import Redis

from cpis_bridge.store.keys import Keys

ID_BYTES = 24  # 192 random bits, URL-safe text of 32 characters
ID_FORM = re.compile(r"[A-Za-z0-9_-]{32}")


class LaunchContexts:
    """core's LaunchStore in Redis."""

    def __init__(self, redis: Redis, keys: Keys, *, ttl_s: int = 600) -> None:
        self.redis = redis
        self.prefix = keys.prefix
        self.ttl_s = ttl_s

    def _key(self, cid: str) -> str:
        return f"{self.prefix}:web:launch:{cid}"

    async def mint(self, context: dict[str, Any]) -> str:
        """Keep ``context`` under a new random id (the card's appContext) for ``ttl_s`` seconds."""
        cid = secrets.token_urlsafe(ID_BYTES)
        await self.redis.set(self._key(cid), orjson.dumps(context), ex=self.ttl_s)
        return cid

    async def take(self, cid: str) -> dict[str, Any] | None:
        """The context, removed as it is read (a launch uses it once); None when unknown, expired or malformed."""
        if not ID_FORM.fullmatch(cid):  # not one we minted: no look-up at all
            return None
        raw = await self.redis.getdel(self._key(cid))
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None
