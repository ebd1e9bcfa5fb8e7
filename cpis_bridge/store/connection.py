"""Opens the Redis client (external CPIS_REDIS_URL, through Sentinel with redis+sentinel://, or the embedded server)
with a blocking connection pool, the relay's dedicated connections (Lane) and the look-up's shared, auto-pipelined
connection (Multiplexed). Every one of them raises core's StoreUnavailable when Redis cannot be reached or does not
answer in time, and the client does for a primary that was demoted or fenced (READONLY, NOREPLICAS); any other Redis
error (a ResponseError: our command was wrong) stays what it is. Under Sentinel every new connection asks for the
current primary, so a connection dropped by a failover reconnects to the new one.

Private seam: Multiplexed writes each batch with ``conn._writer.writelines`` (redis-py's asyncio connection keeps its
``asyncio.StreamWriter`` there). The public ``send_packed_command`` is a coroutine that drains the socket after each
write; calling it per batch would need a task per event-loop tick and would wait on the drain, changing what the
auto-pipelining costs and how it behaves. So pyproject.toml pins redis exactly (==) and
tests/integration/test_lane.py (``test_multiplexed_private_writer_seam``) checks the attribute and that one tick's
commands leave in one write: a redis-py upgrade that moves it fails that test, not production."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, NoReturn

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError, MasterDownError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cpis_bridge.core.errors import StoreUnavailable

# Also redis-py's own classes, so that code catching RedisError (relays, start-up retries) still catches them.


class StoreDown(StoreUnavailable, ConnectionError):
    """Redis cannot be reached (refused, reset, no free connection)."""


class StoreTimeout(StoreUnavailable, RedisTimeoutError):
    """Redis did not answer in time."""


UNREACHABLE = (ConnectionError, RedisTimeoutError, TimeoutError, OSError)
# Error replies that mean "not the primary you need right now", not "your command was wrong": a demoted primary
# (READONLY), a primary fenced by min-replicas-to-write (NOREPLICAS), a replica cut off from its primary (MASTERDOWN).
FAILOVER_REPLIES = ("READONLY", "NOREPLICAS", "MASTERDOWN")


def failover_reply(exc: BaseException) -> bool:
    """redis-py strips the code from the errors it has a class for (READONLY, MASTERDOWN), not from NOREPLICAS."""
    if isinstance(exc, ReadOnlyError | MasterDownError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(FAILOVER_REPLIES)


def unavailable(exc: BaseException) -> NoReturn:
    """Raise the StoreUnavailable for a driver failure (the driver's message says how; it never holds data)."""
    if isinstance(exc, StoreUnavailable):
        raise exc
    timed_out = isinstance(exc, RedisTimeoutError | TimeoutError)
    cls = StoreTimeout if timed_out else StoreDown
    raise cls("Redis did not answer in time" if timed_out else "Redis cannot be reached") from exc


class StorePipeline(Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error)
        except UNREACHABLE as exc:
            unavailable(exc)
        except ResponseError as exc:
            if failover_reply(exc):
                raise StoreDown("Redis refused the write: not a primary with enough replicas") from exc
            raise


class StoreClient(Redis):
    """redis-py's client, raising StoreUnavailable for connection failures and timeouts (also from pipelines)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]  # redis-py's is unannotated
        except UNREACHABLE as exc:
            unavailable(exc)
        except ResponseError as exc:
            if failover_reply(exc):
                raise StoreDown("Redis refused the write: not a primary with enough replicas") from exc
            raise

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> StorePipeline:
        return StorePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        sentinel = getattr(self.connection_pool, "sentinel_manager", None)
        if sentinel is not None:
            await sentinel.aclose()


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The blocking pool (callers wait for a free connection) whose connections ask the Sentinels for the current
    primary each time they connect. A connection that finds the primary demoted (READONLY) or gone is dropped and
    the next one follows the failover."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]  # redis-py's is unannotated


def sentinel_target(url: str) -> tuple[list[tuple[str, int]], str, int, bool] | None:
    """``redis+sentinel://h1:26379,h2:26379/<master>[/<db>]`` as (sentinels, master name, db, tls); None for any
    other URL. Passwords come from settings, not the URL (a password in it is refused: URLs get logged)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        raise ValueError("CPIS_REDIS_URL: give the Sentinel password in CPIS_REDIS_SENTINEL_PASSWORD, not the URL")
    sentinels = []
    for node in filter(None, netloc.split(",")):
        host, colon, port = node.rpartition(":")
        if not colon or not port.isdigit():
            host, port = node, "26379"
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not sentinels or not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError("CPIS_REDIS_URL: expected redis+sentinel://host:26379[,host:26379...]/<master name>[/<db>]")
    return sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0, scheme.lower().startswith("rediss")


def make_client(
    url: str,
    *,
    max_connections: int = 64,
    timeout: float = 5.0,
    command_timeout: float = 10.0,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> Redis:
    """A client whose pool waits up to ``timeout`` for a free connection instead of failing under load
    (docs/architecture.md). ``command_timeout`` bounds each socket read; requests are bounded by their own deadline.
    A ``redis+sentinel://`` URL finds the primary through the Sentinels (redis-py's asyncio Sentinel) and follows
    its failovers; ``password`` authenticates to Redis, ``sentinel_password`` to the Sentinels."""
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout,
        "decode_responses": True,
        "socket_timeout": command_timeout,
        "socket_connect_timeout": min(5.0, command_timeout),
        "health_check_interval": 30,
    }
    if password is not None:
        options["password"] = password
    target = sentinel_target(url)
    if target is None:
        return StoreClient(connection_pool=BlockingConnectionPool.from_url(url, **options))
    nodes, master, db, tls = target
    sentinel_options: dict[str, Any] = {"socket_timeout": min(1.0, command_timeout), "socket_connect_timeout": 1.0}
    if sentinel_password is not None:
        sentinel_options["password"] = sentinel_password
    if tls:
        sentinel_options["ssl"] = True
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_options)
    pool = BlockingSentinelPool(master, sentinel, db=db, ssl=tls, **options)
    return StoreClient(connection_pool=pool)


def _dedicated(redis: Redis) -> tuple[type[AbstractConnection], dict[str, Any]]:
    """How to open connections like the client's pool does, outside it; the owner's own timeout bounds each
    command, so no socket timeout (nor its ``wait_for`` per read)."""
    pool = redis.connection_pool
    return pool.connection_class, dict(pool.connection_kwargs, socket_timeout=None)


class Lane:
    """Dedicated connections for the relay's batches, including its blocking XREADGROUP. Against the shared pool's
    path it saves, per call, the pool's lock and timeout, redis-py's Python command packing (hiredis packs in C) and
    the task that ``wait_for`` creates around each socket write. One ``asyncio.timeout`` bounds each round trip
    instead. At most ``size`` connections, opened on first use; callers beyond that wait. Replies are raw (no
    redis-py response callbacks). Like the client's default retry, a connection error or timeout is retried once on
    a fresh connection."""

    def __init__(self, redis: Redis, *, size: int = 8, timeout: float = 10.0) -> None:
        self._class, self._kwargs = _dedicated(redis)
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
                        if not conn.is_connected:  # connect() itself: a Sentinel-managed one asks for the primary
                            await conn.connect()
                        await conn.send_packed_command(packed, check_health=False)  # the retry below is the check
                        out: list[Any] = []
                        for _ in packed:
                            try:
                                out.append(await conn.read_response())
                            except ResponseError as exc:  # a whole error reply was read: the connection is fine
                                out.append(exc)
                except UNREACHABLE as exc:
                    await self._drop(conn)
                    if attempt == 2:
                        unavailable(exc)
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


class Multiplexed:
    """One connection shared by every caller, for short commands that never block (the look-up's EVALSHA): what
    the callers submit within one event-loop tick goes out in one write, Redis reads, runs and answers it as a batch,
    and replies are matched to callers in order (auto-pipelining). Against a connection per request it cuts Redis's
    CPU per look-up (one read, one write and one AOF flush serve many commands) and the service's socket writes.

    A watchdog fails the connection once the oldest command has waited ``timeout`` (it fits inside a request's
    deadline); a connection error is retried once on a fresh connection, a timeout is not. Never for blocking
    commands (XREADGROUP BLOCK would stall every caller behind it). Replies are raw, as Lane's."""

    def __init__(self, redis: Redis, *, timeout: float = 10.0) -> None:
        self._class, self._kwargs = _dedicated(redis)  # the watchdog bounds each command
        self._timeout = timeout
        self._conn: AbstractConnection | None = None
        self._connecting: asyncio.Task[AbstractConnection] | None = None
        self._outgoing: list[bytes] = []  # packed commands for the current connection, not yet written
        self._waiting: deque[tuple[float, asyncio.Future[Any]]] = deque()  # (submitted at, caller), written order
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def call(self, *args: Any) -> Any:
        """One command; an error reply is raised as redis-py raises it (NoScriptError, ResponseError, ...)."""
        packed = hiredis.pack_command(args)
        for attempt in (1, 2):
            try:
                reply = await self._submit(packed)
            except RedisTimeoutError as exc:
                # Redis is stalled, not gone: another attempt would wait as long again (past the request's
                # deadline), and the command sent may still run once Redis resumes.
                unavailable(exc)
            except UNREACHABLE as exc:
                if attempt == 2:
                    unavailable(exc)
                continue
            if isinstance(reply, ResponseError):
                raise reply
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def _submit(self, packed: bytes) -> Any:
        conn = self._conn if self._conn is not None else await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._outgoing:
            loop.call_soon(self._flush, conn)
        self._outgoing.append(packed)
        self._waiting.append((loop.time(), future))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check)
        return await future

    async def _connect(self) -> AbstractConnection:
        """Every caller that finds no connection waits for the same attempt, and shares its failure (then retries
        once): while Redis is down, callers are not queued behind one another's attempts."""
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = asyncio.get_running_loop().create_task(self._open())
            attempt.add_done_callback(self._connected)
        return await asyncio.shield(attempt)

    def _connected(self, attempt: asyncio.Task[AbstractConnection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here too: every caller may have gone

    async def _open(self) -> AbstractConnection:
        conn = self._class(**self._kwargs)
        try:
            async with asyncio.timeout(self._timeout):
                await conn.connect()
        except TimeoutError as exc:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError("Redis did not answer in time") from exc
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._conn = conn
        self._reader = asyncio.create_task(self._read(conn))
        return conn

    def _flush(self, conn: AbstractConnection) -> None:
        if conn is not self._conn:
            return  # that connection failed meanwhile; its callers have their error
        out, self._outgoing = self._outgoing, []
        try:
            # The private seam (module docstring); no drain: callers bound what is in flight.
            conn._writer.writelines(out)  # type: ignore[union-attr]  # None once disconnected: caught below
        except Exception as exc:  # a broken transport fails its callers
            self._fail(conn, ConnectionError(f"Redis connection failed: {exc}"))

    async def _read(self, conn: AbstractConnection) -> None:
        try:
            while True:
                try:
                    reply = await conn.read_response()
                except ResponseError as exc:  # a whole error reply: the connection is fine
                    reply = exc
                if not self._waiting or conn is not self._conn:
                    raise ConnectionError("a reply no command was waiting for")
                _, future = self._waiting.popleft()
                if not future.done():  # a caller that gave up (cancelled) still had its reply read
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever broke the connection fails its callers
            self._fail(conn, exc if isinstance(exc, RedisError) else ConnectionError(f"Redis connection failed: {exc}"))

    def _check(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        due = self._waiting[0][0] + self._timeout
        if loop.time() >= due:
            self._fail(self._conn, RedisTimeoutError("Redis did not answer in time"))
        else:
            self._watchdog = loop.call_at(due, self._check)

    def _fail(self, conn: AbstractConnection | None, exc: BaseException) -> None:
        """Drop the connection and fail every caller waiting on it (they retry once, on a fresh one)."""
        if conn is None or conn is not self._conn:
            return
        self._conn, self._outgoing = None, []
        waiting, self._waiting = self._waiting, deque()
        for _, future in waiting:
            if not future.done():
                future.set_exception(exc)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        task = asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        self._fail(self._conn, ConnectionError("the Redis connection was closed"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
