"""Loads the Lua scripts in ``lua/`` (each prefixed with ``lib.lua``) and registers them on a client."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_DIR = Path(__file__).parent / "lua"


@cache
def source(name: str) -> str:
    return (_DIR / "lib.lua").read_text() + "\n" + (_DIR / f"{name}.lua").read_text()


class Scripts:
    """The project's scripts, bound to one client. redis-py reloads a script transparently after NOSCRIPT."""

    def __init__(self, redis: Redis) -> None:
        self.apply_records: AsyncScript = redis.register_script(source("apply_records"))
        self.erase_record: AsyncScript = redis.register_script(source("erase_record"))
        self.access: AsyncScript = redis.register_script(source("access"))
        self._redis = redis

    def register(self, name: str) -> Any:
        return self._redis.register_script(source(name))
