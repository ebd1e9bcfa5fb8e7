"""Write confirmation by replicas (CPIS_REDIS_MIN_REPLICAS, docs/contract.md §1): a write step is acknowledged only
once that many replicas hold it. The step, a fence write and ``WAIT`` (or ``WAITAOF``: the replicas' AOF fsync) go
in one pipeline on one connection, so the wait covers exactly what that connection wrote on that server, including
a step that found its work already done (an idempotent retry: the fence write makes the wait cover the earlier
attempt too). Unconfirmed in time: ``ReplicasUnconfirmed`` (503 with Retry-After), and the client's retry of the
same step (TraceID, Encounter identifier, upload sequence) is idempotent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from cpis_bridge.core.errors import StoreUnavailable
from cpis_bridge.store.connection import UNREACHABLE, failover_reply, unavailable

Command = tuple[Any, ...]


class ReplicasUnconfirmed(StoreUnavailable):
    """The write ran on the primary but too few replicas confirmed it in time (or the primary refused it)."""


class Replicas:
    """How many replicas must confirm each write step, and how to ask. ``count`` 0: no wait (no extra commands)."""

    def __init__(self, count: int = 0, timeout_s: float = 1.0, *, fence_key: str = "", aof: bool = False) -> None:
        self.count = count
        self.timeout_ms = max(1, int(timeout_s * 1000))  # WAIT's 0 means "forever"
        self.fence_key = fence_key
        self.aof = aof

    @property
    def enabled(self) -> bool:
        return self.count > 0

    @classmethod
    async def for_server(cls, redis: Redis, count: int, timeout_s: float, *, fence_key: str, mode: str) -> Replicas:
        """``mode`` wait: WAIT (replicas hold the write in memory). waitaof: WAITAOF (replicas have fsynced it to their
        AOF) where the server has it (Redis 7.2+, Valkey) and persists with AOF itself, else WAIT. WAIT is the
        default: replicas report their AOF fsync on a once-a-second acknowledgement, and here WAITAOF took up to a
        second under load where WAIT answered in milliseconds."""
        aof = False
        if count and mode == "waitaof":
            server = await redis.info("server")  # WAITAOF came with Redis 7.2 (Valkey reports 7.2.4 here too)
            version = tuple(int(p) for p in str(server.get("redis_version", "0")).split(".")[:2] if p.isdigit())
            if version >= (7, 2):
                persistence = await redis.info("persistence")
                aof = bool(int(persistence.get("aof_enabled", 0)))
        return cls(count, timeout_s, fence_key=fence_key, aof=aof)

    def commands(self) -> list[Command]:
        """Appended to a write step's pipeline: the fence write (so the wait always covers everything this server
        acknowledged before it), then the wait."""
        if not self.enabled:
            return []
        n, ms = self.count, self.timeout_ms
        wait: Command = ("WAITAOF", 1, n, ms) if self.aof else ("WAIT", n, ms)
        return [("SET", self.fence_key, "1"), wait]

    def check(self, replies: Sequence[Any]) -> None:
        """Raise unless the replies to :meth:`commands` (the pipeline's last two) show enough replicas."""
        if not self.enabled:
            return
        fence, acked = replies[-2], replies[-1]
        for reply in (fence, acked):
            if isinstance(reply, BaseException):
                self.refused(reply)
        confirmed = int(acked[1] if self.aof else acked)
        if confirmed < self.count:
            raise ReplicasUnconfirmed(f"the write was confirmed by {confirmed} of {self.count} replicas in time")

    @staticmethod
    def refused(exc: BaseException) -> None:
        """Raise the StoreUnavailable for an error reply that means "not a primary that can confirm writes"; any other
        error as it is."""
        if failover_reply(exc):
            raise ReplicasUnconfirmed("Redis refused the write: not a primary with enough replicas") from exc
        if isinstance(exc, UNREACHABLE):
            unavailable(exc)
        raise exc


NO_REPLICAS = Replicas()
