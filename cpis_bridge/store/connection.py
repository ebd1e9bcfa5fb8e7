"""Opens the Redis client: external (CPIS_REDIS_URL) or the embedded server, with a blocking connection pool."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis


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
