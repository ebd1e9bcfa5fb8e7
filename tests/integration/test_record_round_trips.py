"""The record writes answer what the caller needs in one round trip (apply_records.lua returns the stored record,
erase_record.lua needs only the index read first, an upload's scan reads records from the index it already has):
counted on a real Redis client that counts what it sends."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from cpis_bridge.core.ports import Change
from cpis_bridge.core.records import Record
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.records import RedisRecordStore
from cpis_bridge.store.scripts import Scripts
from tests.integration.test_port_contracts import CHILD, OTHER, change, rec
from tests.support.world import HASH_KEY

LA = "LA001"


class CountingPipeline(Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.counter.trips += 1  # type: ignore[attr-defined]
        return await super().execute(raise_on_error)


class CountingRedis(Redis):
    """redis-py's client, counting its round trips (a command, or a pipeline's batch)."""

    trips = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.trips += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = CountingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.counter = self  # type: ignore[attr-defined]
        return pipe


@pytest.fixture
async def store(redis_url: str, key_prefix: str) -> AsyncIterator[tuple[RedisRecordStore, CountingRedis]]:
    client = CountingRedis.from_url(redis_url, decode_responses=True)
    keys = Keys(key_prefix, HASH_KEY.encode())
    scripts = Scripts(client)
    await client.script_load(scripts.apply_records.script)  # EVALSHA finds them: no NOSCRIPT retry counted
    await client.script_load(scripts.erase_record.script)
    try:
        yield RedisRecordStore(client, keys, scripts, sync_enabled=True), client
    finally:
        await client.aclose()


async def trips(client: CountingRedis, call: Any) -> tuple[int, Any]:
    before = client.trips
    out = await call
    return client.trips - before, out


async def test_put_is_one_round_trip_and_answers_what_get_reads(store: tuple[RedisRecordStore, CountingRedis]) -> None:
    records, client = store
    n, (code, created) = await trips(client, records.put(LA, change(rec())))
    assert n == 1 and code == "C"
    assert created == await records.get(LA, "A-1")
    n, (code, same) = await trips(client, records.put(LA, change(rec())))
    assert n == 1 and code == "U" and same == created
    n, (code, moved) = await trips(client, records.put(LA, change(rec(nhs=OTHER, end_date=dt.date(2026, 2, 1)))))
    assert n == 3 and code == "M" and moved == await records.get(LA, "A-1")  # moved: a retry reads the index
    assert moved.version == 2


async def test_erase_reads_the_index_once(store: tuple[RedisRecordStore, CountingRedis]) -> None:
    records, client = store
    await records.apply(LA, [change(rec())])
    seen: list[str] = []

    def audit(nhs: str) -> dict[str, Any]:
        seen.append(nhs)
        return {"action": "record.erase", "nhsNumber": nhs}

    n, done = await trips(client, records.erase(LA, "A-1", audit))
    assert n == 2 and done is True and seen == [CHILD]
    n, done = await trips(client, records.erase(LA, "A-1", audit))
    assert n == 1 and done is False and seen == [CHILD]


async def test_records_from_the_index_in_one_round_trip(store: tuple[RedisRecordStore, CountingRedis]) -> None:
    records, client = store
    changes: list[Change] = [change(rec(f"A-{i}", CHILD if i % 2 else OTHER)) for i in range(40)]
    await records.apply(LA, changes)
    entries = sorted((await records.index(LA)).items())
    n, got = await trips(client, records.get_indexed(LA, entries))
    assert n == 1
    expected: list[Record | None] = await records.get_many(LA, [lid for lid, _ in entries])
    assert got == expected and all(r is not None for r in got)
