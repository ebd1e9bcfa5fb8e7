"""Whether Redis answers: the probe behind /readyz and the store monitor (core's StoreHealth port)."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis


class RedisHealth:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def ping(self, timeout_s: float) -> bool:
        # A stalled Redis (frozen, or swapping) accepts connections and never answers: only a short probe tells it
        # from a healthy one.
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self.redis.ping())
        except Exception:
            return False
