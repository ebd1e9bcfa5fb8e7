"""The clinician view's launch contexts in a real Redis: an opaque id (no NHS number in it or in the key), read once,
gone after its time; ids that cannot be ours are not looked up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aredis

from cpis_bridge.store.keys import Keys
from cpis_bridge.store.launch import LaunchContexts
from tests.support.world import HASH_KEY

CONTEXT = {"nhs": "9990000018", "cs": "RXX01", "patient": "pat-1", "user": {"id": "PractitionerRole/pr-1"}}


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aredis.Redis]:
    r = aredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def test_taken_once_and_opaque(redis: aredis.Redis, key_prefix: str) -> None:
    contexts = LaunchContexts(redis, Keys(key_prefix, HASH_KEY.encode()), ttl_s=60)
    cid = await contexts.mint(CONTEXT)
    assert len(cid) == 32 and "9990000018" not in cid
    keys = [k.decode() async for k in redis.scan_iter(match=f"{key_prefix}:*")]
    assert keys == [f"{key_prefix}:web:launch:{cid}"]
    assert 0 < await redis.ttl(keys[0]) <= 60
    assert await contexts.take(cid) == CONTEXT
    assert await contexts.take(cid) is None  # used: gone


async def test_expires(redis: aredis.Redis, key_prefix: str) -> None:
    contexts = LaunchContexts(redis, Keys(key_prefix, HASH_KEY.encode()), ttl_s=1)
    cid = await contexts.mint(CONTEXT)
    await asyncio.sleep(1.2)
    assert await contexts.take(cid) is None


@pytest.mark.parametrize("cid", ["", "x" * 33, "é" * 32, "*" * 32, "x" * 31 + "\n"])
async def test_ids_that_cannot_be_ours_are_not_looked_up(redis: aredis.Redis, key_prefix: str, cid: Any) -> None:
    contexts = LaunchContexts(redis, Keys(key_prefix, HASH_KEY.encode()))
    await redis.set(f"{key_prefix}:web:launch:{cid}", b"{}")
    assert await contexts.take(cid) is None
