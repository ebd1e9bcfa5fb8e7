"""Lua scripts sent outside redis-py's wrapper, against a real Redis: a script the server does not know (a new or
restarted primary, a flush) runs through the one NOSCRIPT fallback (store/scripts.run_scripts), each call exactly
once, alone on the shared connection and pipelined on the relay's lane, with the replicas' tail checked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError

from cpis_bridge.store.connection import Lane, make_client
from cpis_bridge.store.scripts import run_scripts


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = make_client(redis_url)
    yield client
    await client.aclose()


def unknown_script(redis: Any, tag: str) -> Any:
    """A script the server has never seen (its text is unique), so the first EVALSHA is answered NOSCRIPT."""
    return redis.register_script(f"-- {tag}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")


async def test_an_unknown_script_runs_once_per_call_then_by_its_sha(redis: Any, key_prefix: str) -> None:
    key, other = f"{key_prefix}:m", f"{key_prefix}:o"
    lane = Lane(redis, size=1)
    sent: list[str] = []

    async def send(commands: list[Any]) -> list[Any]:
        sent.extend(str(c[0]) for c in commands)
        return await lane.pipeline(commands)

    try:
        script = unknown_script(redis, f"{key_prefix}-many")
        out = await run_scripts(send, script, [([key], [1]), ([other], [10]), ([key], [2])])
        assert out == [1, 10, 3] and sent == ["EVALSHA"] * 3 + ["EVAL"] * 3  # refused, then sent once each
        sent.clear()
        assert await run_scripts(send, script, [([key], [4])]) == [7] and sent == ["EVALSHA"]  # cached now
    finally:
        await lane.aclose()
    assert int(await redis.get(key)) == 7 and int(await redis.get(other)) == 10


async def test_the_tail_is_checked_when_a_call_ran_and_errors_stay_in_place(redis: Any, key_prefix: str) -> None:
    lane = Lane(redis, size=1)
    checked: list[list[Any]] = []
    key = f"{key_prefix}:t"
    try:
        await redis.set(key, "not a number")
        script = unknown_script(redis, f"{key_prefix}-tail")
        tail = [("ECHO", "fence")]
        [reply] = await run_scripts(lane.pipeline, script, [([key], [1])], tail, checked.append)
        assert isinstance(reply, ResponseError)  # the script's own error, in its place
        assert len(checked) == 1 and checked[0][-1] == "fence"  # not for the NOSCRIPT round trip, where none ran
    finally:
        await lane.aclose()
