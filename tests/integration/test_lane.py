"""The relay's dedicated Redis connections (store.connection.Lane) against a real Redis: replies, error replies,
a connection killed under it, the size bound, a hung server's timeout, and closing; the same for the shared,
auto-pipelined connection (Multiplexed), with many callers and cancelled ones."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cpis_bridge.store.connection import Lane, Multiplexed, make_client
from tests.support.polling import wait_for_async


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = make_client(redis_url)
    yield client
    await client.aclose()


async def test_call_and_pipeline_return_raw_replies_with_errors_in_place(redis: Any, key_prefix: str) -> None:
    lane = Lane(redis, size=2)
    try:
        key = f"{key_prefix}:lane"
        assert await lane.call("RPUSH", key, "a", b"b", 3) == 3
        assert await lane.call("LRANGE", key, 0, -1) == ["a", "b", "3"]
        out = await lane.pipeline([("LLEN", key), ("HGET", key, "x"), ("EVALSHA", "0" * 40, 0), ("GET", "none")])
        assert out[0] == 3 and out[3] is None
        assert isinstance(out[1], ResponseError) and "WRONGTYPE" in str(out[1])
        assert isinstance(out[2], NoScriptError)
        with pytest.raises(NoScriptError):
            await lane.call("EVALSHA", "0" * 40, 0)
        assert await lane.call("LLEN", key) == 3  # the connection that read the error replies is still in step
        assert len(lane._open) == 1
    finally:
        await lane.aclose()
    assert not lane._open


async def test_a_killed_connection_is_replaced_and_the_command_retried(redis: Any, key_prefix: str) -> None:
    lane = Lane(redis, size=1)
    try:
        name = f"{key_prefix}-lane"
        assert await lane.call("CLIENT", "SETNAME", name) == "OK"
        clients = await redis.client_list()
        [victim] = [c for c in clients if c.get("name") == name]
        assert await redis.client_kill_filter(_id=victim["id"]) == 1
        assert await lane.call("INCR", f"{key_prefix}:n") == 1  # once: the dead connection failed before sending
        assert await redis.get(f"{key_prefix}:n") == "1"
        assert len(lane._open) == 1
    finally:
        await lane.aclose()


async def test_at_most_size_connections_are_opened(redis: Any, key_prefix: str) -> None:
    lane = Lane(redis, size=3)
    try:
        results = await asyncio.gather(*(lane.call("INCR", f"{key_prefix}:c") for _ in range(50)))
        assert sorted(results) == list(range(1, 51))
        assert 1 <= len(lane._open) <= 3
    finally:
        await lane.aclose()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts and never answers: a hung Redis."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join()
    for s in held:
        s.close()
    sock.close()


async def test_a_hung_server_times_out_as_a_redis_error(silent_server: int) -> None:
    client = make_client(f"redis://127.0.0.1:{silent_server}/0")
    lane = Lane(client, timeout=0.2)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RedisTimeoutError):
            await lane.call("PING")
        assert asyncio.get_running_loop().time() - started < 2.0  # two attempts of 0.2 s, not the socket timeout
        assert not lane._open  # both timed-out connections were dropped
    finally:
        await lane.aclose()
        await client.aclose()


# -- Multiplexed: one shared, auto-pipelined connection ---------------------------------------------------------------


async def client_count(redis: Any, name: str) -> int:
    return sum(1 for c in await redis.client_list() if c.get("name") == name)


async def test_multiplexed_answers_many_callers_in_order_on_one_connection(redis: Any, key_prefix: str) -> None:
    mux = Multiplexed(redis)
    name = f"{key_prefix}-mux"
    try:
        assert await mux.call("CLIENT", "SETNAME", name) == "OK"
        key = f"{key_prefix}:mux"
        # Each caller's reply is its own: INCRBY by i answers a running total, ECHO answers its own word.
        out = await asyncio.gather(
            *(mux.call("ECHO", f"w{i}") for i in range(300)), *(mux.call("INCRBY", key, 1) for _ in range(300))
        )
        assert out[:300] == [f"w{i}" for i in range(300)]
        assert sorted(out[300:]) == list(range(1, 301))
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await mux.call("LPUSH", key, "x")
        with pytest.raises(NoScriptError):
            await mux.call("EVALSHA", "0" * 40, 0)
        assert await mux.call("GET", key) == "300"  # still in step after the error replies
        assert await client_count(redis, name) == 1
    finally:
        await mux.aclose()
    # the server notices the closed socket a moment later
    await wait_for_async(lambda: _none(client_count(redis, name)), timeout=5, what="the connection stayed open")


async def test_multiplexed_private_writer_seam(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py is pinned exactly (pyproject.toml) because Multiplexed writes to a connection's private ``_writer``
    (store/connection.py): an upgrade that moves or changes it fails here. What one event-loop tick submits leaves in
    one write, and every caller gets its own reply."""
    mux = Multiplexed(redis)
    try:
        assert await mux.call("PING") in ("PONG", True)
        writer = mux._conn._writer  # type: ignore[union-attr]
        assert isinstance(writer, asyncio.StreamWriter)
        writes: list[int] = []
        real = writer.writelines

        def counted(data: Any) -> None:
            data = list(data)
            writes.append(len(data))
            real(data)

        monkeypatch.setattr(writer, "writelines", counted)
        out = await asyncio.gather(*(mux.call("ECHO", f"s{i}") for i in range(50)))
        assert out == [f"s{i}" for i in range(50)]
        assert writes == [50]
    finally:
        await mux.aclose()


async def test_multiplexed_cancelled_callers_do_not_shift_the_replies(redis: Any, key_prefix: str) -> None:
    mux = Multiplexed(redis)
    try:
        assert await mux.call("PING") in ("PONG", True)
        first = mux._conn
        slow = [asyncio.create_task(mux.call("ECHO", f"gone{i}")) for i in range(20)]
        await asyncio.sleep(0)  # submitted, not yet answered
        for t in slow:
            t.cancel()
        assert await asyncio.gather(*(mux.call("ECHO", f"k{i}") for i in range(50))) == [f"k{i}" for i in range(50)]
        assert mux._conn is first  # the abandoned replies were read and dropped, the connection kept
    finally:
        await mux.aclose()


async def test_multiplexed_killed_connection_fails_over_and_retries(redis: Any, key_prefix: str) -> None:
    mux = Multiplexed(redis)
    name = f"{key_prefix}-muxkill"
    try:
        assert await mux.call("CLIENT", "SETNAME", name) == "OK"
        [victim] = [c for c in await redis.client_list() if c.get("name") == name]
        assert await redis.client_kill_filter(_id=victim["id"]) == 1
        out = await asyncio.gather(*(mux.call("INCR", f"{key_prefix}:m") for _ in range(20)))
        assert sorted(out) == list(range(1, 21))  # each once: the dead connection failed before they were sent
    finally:
        await mux.aclose()


async def test_multiplexed_hung_server_times_out_as_a_redis_error(silent_server: int) -> None:
    client = make_client(f"redis://127.0.0.1:{silent_server}/0")
    mux = Multiplexed(client, timeout=0.2)
    try:
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(mux.call("PING") for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results)
        # Two shared connection attempts of 0.2 s for all 20 callers, not 20 queued one behind another.
        assert asyncio.get_running_loop().time() - started < 1.5
        assert mux._conn is None and not mux._waiting
    finally:
        await mux.aclose()
        await client.aclose()


async def _none(count: Awaitable[int]) -> bool:
    return await count == 0
