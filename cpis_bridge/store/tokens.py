"""CDS client token ids (jti) already used: each is accepted once per issuer, remembered until the token expires."""

from __future__ import annotations

from redis.asyncio import Redis

from cpis_bridge.store.keys import Keys


class SeenTokens:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def first_use(self, iss: str, jti: str, ttl_s: int) -> bool:
        """True the first time ``jti`` of ``iss`` is presented (and remembers it for ``ttl_s``); False on a replay."""
        return bool(await self.redis.set(self.keys.cds_jti(iss, jti), b"1", nx=True, ex=max(1, ttl_s)))
