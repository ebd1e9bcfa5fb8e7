"""Loads the Lua scripts in ``lua/`` (each prefixed with ``lib.lua``), registers them on a client, runs the write
steps among them confirmed by replicas when configured (replicas.py), and holds the one NOSCRIPT fallback for
scripts sent outside redis-py's wrapper (:func:`run_scripts`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from cpis_bridge.store.connection import failover_reply
from cpis_bridge.store.replicas import NO_REPLICAS, Command, Replicas

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
        """A write step: the script, acknowledged once ``replicas`` confirm it (503 otherwise): its EVALSHA, the fence
        and the wait in one pipeline (one round trip). Without replicas to wait for, the plain script call."""
        replicas = self.replicas
        if not replicas.enabled:
            return await script(keys=list(keys), args=list(args))

        async def send(commands: list[Command]) -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute(raise_on_error=False)

        def check(out: list[Any]) -> None:
            if isinstance(out[0], ResponseError) and failover_reply(out[0]):
                replicas.refused(out[0])
            replicas.check(out)

        [result] = await run_scripts(send, script, [(keys, args)], replicas.commands(), check)
        if isinstance(result, BaseException):
            raise result
        return result


Send = Callable[[list[Command]], Awaitable[list[Any]]]


async def run_scripts(
    send: Send,
    script: AsyncScript,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    tail: Sequence[Command] = (),
    check: Callable[[list[Any]], None] | None = None,
) -> list[Any]:
    """Each (keys, args) call of ``script`` as EVALSHA, in one round trip through ``send`` (commands in, replies out,
    an error reply in its place), followed by the ``tail`` commands (the replicas' fence and wait), whose round trip's
    replies go to ``check`` whenever some call ran. A server that answers NOSCRIPT (a new or restarted primary, a
    flush) gets just the refused calls again, as EVAL on the same connection (a SCRIPT LOAD elsewhere could reach
    another server), which caches the script. Returns the calls' replies in order. The one NOSCRIPT fallback of the
    scripts sent outside redis-py's wrapper (which does its own)."""
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for call, body in (("EVALSHA", script.sha), ("EVAL", script.script)):
        out = await send([(call, body, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in todo] + list(tail))
        replies = out[: len(todo)]
        refused = [i for i, reply in zip(todo, replies, strict=True) if isinstance(reply, NoScriptError)]
        if check is not None and tail and len(refused) < len(todo):
            check(out)
        for i, reply in zip(todo, replies, strict=True):
            results[i] = reply
        todo = refused
        if not todo:
            break
    return results
