"""Opens the Redis client: external (CPIS_REDIS_URL) or the embedded server, with a blocking connection pool."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError, ResponseError, TimeoutError


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


async def call(redis: Redis, *args: Any) -> Any:
    """One command on a pooled connection without the client's per-call wrappers (retry closure, observability
    hooks: tens of microseconds a call, measured): for the hot path's EVALSHA. Like the client's default retry, a
    connection error or timeout is retried once on a fresh connection; errors from Redis are raised as they are."""
    pool = redis.connection_pool
    for attempt in (1, 2):
        conn = await pool.get_connection()
        try:
            await conn.send_command(*args)
            return await conn.read_response()
        except (ConnectionError, TimeoutError):
            await conn.disconnect()
            if attempt == 2:
                raise
        except ResponseError:
            raise  # a whole error reply was read: the connection stays usable
        except BaseException:
            await conn.disconnect()  # cancelled or failed mid-command: never reuse a half-read connection
            raise
        finally:
            await pool.release(conn)
    raise AssertionError("unreachable")  # pragma: no cover
