"""Loads the Lua scripts in ``lua/`` (each prefixed with ``lib.lua``), registers them on a client and runs the write
steps among them confirmed by replicas when configured (replicas.py)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from cpis_bridge.store.replicas import NO_REPLICAS, Replicas

_DIR = Path(__file__).parent / "lua"


@cache
def source(name: str) -> str:
    return (_DIR / "lib.lua").read_text() + "\n" + (_DIR / f"{name}.lua").read_text()


class Scripts:
    """The project's scripts, bound to one client. redis-py reloads a script transparently after NOSCRIPT."""

    def __init__(self, redis: Redis, replicas: Replicas = NO_REPLICAS) -> None:
        self.apply_records: AsyncScript = redis.register_script(source("apply_records"))
        self.erase_record: AsyncScript = redis.register_script(source("erase_record"))
        self.access: AsyncScript = redis.register_script(source("access"))
        self._redis = redis
        self.replicas = replicas

    def register(self, name: str) -> Any:
        return self._redis.register_script(source(name))

    async def write(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """A write step: the script, acknowledged once ``replicas`` confirm it (503 otherwise)."""
        return await self.replicas.run(self._redis, script, keys, args)
