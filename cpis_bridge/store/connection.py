"""Opens the Redis client (external CPIS_REDIS_URL or the embedded server) with a blocking connection pool, and the
hot path's dedicated connections (Lane)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def make_client(url: str, *, max_connections: int = 64, timeout: float = 5.0) -> Redis:
    """A client whose pool waits for a free connection instead of failing under load (ARCHITECTURE.md)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        decode_responses=True,
        socket_timeout=10.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


class Lane:
    """Dedicated connections for the per-request hot path (one EVALSHA per look-up) and the relay's batches. Against
    the shared pool's path it saves, per call, the pool's lock and timeout, redis-py's Python command packing
    (hiredis packs in C) and the task that ``wait_for`` creates around each socket write: a third of a look-up's
    CPU, measured. One ``asyncio.timeout`` bounds each round trip instead. At most ``size`` connections, opened on
    first use; callers beyond that wait. Replies are raw (no redis-py response callbacks). Like the client's
    default retry, a connection error or timeout is retried once on a fresh connection."""

    def __init__(self, redis: Redis, *, size: int = 32, timeout: float = 10.0) -> None:
        pool = redis.connection_pool
        self._class: type[AbstractConnection] = pool.connection_class
        self._kwargs = dict(pool.connection_kwargs, socket_timeout=None)  # the lane's own timeout bounds each trip
        self._idle: list[AbstractConnection] = []
        self._open: set[AbstractConnection] = set()
        self._slots = asyncio.Semaphore(size)
        self._timeout = timeout

    async def call(self, *args: Any) -> Any:
        """One command; an error reply is raised as redis-py raises it (NoScriptError, ResponseError, ...)."""
        [reply] = await self._round_trip([hiredis.pack_command(args)])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Several commands in one round trip, replies in order; an error reply is returned in its place (as
        redis-py's ``execute(raise_on_error=False)``). For commands whose repetition after a lost connection is
        harmless: reads, and scripts that settle idempotently."""
        return await self._round_trip([hiredis.pack_command(tuple(c)) for c in commands])

    async def _round_trip(self, packed: list[bytes]) -> list[Any]:
        async with self._slots:
            for attempt in (1, 2):
                conn = self._idle.pop() if self._idle else self._connection()
                try:
                    async with asyncio.timeout(self._timeout):
                        await conn.send_packed_command(packed)
                        out: list[Any] = []
                        for _ in packed:
                            try:
                                out.append(await conn.read_response())
                            except ResponseError as exc:  # a whole error reply was read: the connection is fine
                                out.append(exc)
                except (ConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
                    await self._drop(conn)
                    if attempt == 2:
                        if isinstance(exc, RedisError):
                            raise
                        raise RedisTimeoutError("Redis did not answer in time") from exc
                    continue
                except BaseException:
                    await self._drop(conn)  # cancelled or failed mid-reply: never reuse a half-read connection
                    raise
                self._idle.append(conn)
                return out
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> AbstractConnection:
        conn = self._class(**self._kwargs)
        self._open.add(conn)
        return conn

    async def _drop(self, conn: AbstractConnection) -> None:
        self._open.discard(conn)
        await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        conns, self._idle = list(self._open), []
        self._open.clear()
        for conn in conns:
            await conn.disconnect(nowait=True)
