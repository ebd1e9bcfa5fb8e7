"""The audit trail in Redis: per-child append-only lists under the child's keyed-hash tag, plus a system list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from redis.asyncio import Redis

from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.store.keys import Keys


class RedisAuditLog:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def tag(self, nhs: NhsNumber) -> str:
        return self.keys.tag(nhs)

    def key_for(self, nhs: NhsNumber | None) -> str:
        return self.keys.system_audit if nhs is None else self.keys.audit(self.keys.tag(nhs))

    async def append(self, nhs: NhsNumber | None, entry: Mapping[str, Any]) -> None:
        await self.redis.lpush(self.key_for(nhs), orjson.dumps(dict(entry)))

    async def query(self, nhs: NhsNumber, limit: int = 1000) -> list[dict[str, Any]]:
        raw = await self.redis.lrange(self.key_for(nhs), 0, limit - 1)
        return [orjson.loads(r) for r in raw]
