"""Writes confirmed by replicas (CPIS_REDIS_MIN_REPLICAS) and the primary found through Sentinel, against real
servers on loopback: a primary, a replica and a Sentinel from the embedded store's server binary. An unconfirmed
write answers 503 (problem+json, Retry-After) and the client's retry records nothing twice; a write acknowledged
is on the replica when the answer arrives; after a failover the service writes to the new primary (loading its
scripts there)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cpis_bridge.app import create_app
from cpis_bridge.store.connection import sentinel_target
from cpis_bridge.store.keys import Keys
from cpis_bridge.store.scripts import source
from tests.support.redis_ha import MASTER, Node, in_sync, server_binary, wait_until
from tests.support.world import ED, HASH_KEY, LA1, record

pytestmark = pytest.mark.skipif(server_binary() is None, reason="no redis-server or valkey-server binary")

NHS = "9990000018"
CARETEAM = f"/fhir/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|{NHS}"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    """A primary and one replica, in sync."""
    primary = Node(tmp_path / "primary").start()
    replica = Node(tmp_path / "replica", replica_of=primary.port).start()
    try:
        wait_until(lambda: in_sync(primary, [replica]))
        yield [primary, replica]
    finally:
        replica.stop()
        primary.stop()


def child_state(node: Node, prefix: str) -> tuple[int, int]:
    """(accesses recorded for the child, notifications in LA001's inbox) as that server holds them."""
    keys = Keys(prefix, HASH_KEY.encode())
    c = node.client()
    return int(c.llen(keys.accesses(keys.tag(NHS)))), int(c.xlen(keys.inbox("LA001")))


def test_sentinel_urls_are_parsed_and_never_carry_a_password() -> None:
    assert sentinel_target("redis://127.0.0.1:6379/0") is None
    assert sentinel_target("redis+sentinel://h1:26379,h2:26380/mymaster") == (
        [("h1", 26379), ("h2", 26380)],
        "mymaster",
        0,
        False,
    )
    assert sentinel_target("rediss+sentinel://h1/cpis/2") == ([("h1", 26379)], "cpis", 2, True)
    for bad in ("redis+sentinel://h1:26379", "redis+sentinel:///m", "redis+sentinel://h1/m/x"):
        with pytest.raises(ValueError, match="expected"):
            sentinel_target(bad)
    with pytest.raises(ValueError) as refused:
        sentinel_target("redis+sentinel://:hunter2-secret@h1:26379/m")
    assert "hunter2" not in str(refused.value)


async def test_an_acknowledged_access_is_on_the_replica_and_an_unconfirmed_one_is_503_then_retried_once(
    aiohttp_client: Any, make_settings: Any, key_prefix: str, nodes: list[Node]
) -> None:
    primary, replica = nodes
    settings = make_settings(redis_url=primary.url, redis_min_replicas=1, relays=False)
    client = await aiohttp_client(create_app(settings))
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201

    r = await client.get(CARETEAM, headers={**ED, "TraceID": "confirmed-1"})
    assert r.status == 200
    assert child_state(replica, key_prefix) == (1, 1)  # on the replica as soon as the answer arrives

    replica.client().execute_command("REPLICAOF", "NO", "ONE")  # the primary has no replica now
    wait_until(lambda: primary.client().info("replication")["connected_slaves"] == 0)
    started = time.monotonic()
    r = await client.get(CARETEAM, headers={**ED, "TraceID": "unconfirmed-1"})
    assert r.status == 503 and r.headers["Retry-After"]
    assert r.headers["Content-Type"].startswith("application/fhir+json")  # the FHIR API's problem: an outcome
    assert time.monotonic() - started < settings.request_deadline_s
    assert child_state(primary, key_prefix) == (2, 2)  # ran on the primary, not acknowledged
    r = await client.put("/v1/records/CASE-2", json=record("CASE-2"), headers=LA1)
    assert r.status == 503 and r.headers["Retry-After"]
    assert r.headers["Content-Type"] == "application/problem+json"

    replica.client().execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
    wait_until(lambda: in_sync(primary, [replica]))
    r = await client.get(CARETEAM, headers={**ED, "TraceID": "unconfirmed-1"})  # the client's retry
    assert r.status == 200
    assert child_state(primary, key_prefix) == (2, 2)  # no second access, no second notification
    assert child_state(replica, key_prefix) == (2, 2)
    assert (await client.put("/v1/records/CASE-2", json=record("CASE-2"), headers=LA1)).status in (200, 201)


async def test_an_upload_unconfirmed_is_503_and_its_resend_applies_it_once(
    aiohttp_client: Any, make_settings: Any, key_prefix: str, nodes: list[Node]
) -> None:
    primary, replica = nodes
    settings = make_settings(redis_url=primary.url, redis_min_replicas=1, relays=False)
    client = await aiohttp_client(create_app(settings))
    body = {"sequence": 7, "mode": "delta", "recordCount": 2, "records": [record("A"), record("B", planType="LAC")]}
    replica.client().execute_command("REPLICAOF", "NO", "ONE")
    wait_until(lambda: primary.client().info("replication")["connected_slaves"] == 0)
    r = await client.post("/v1/uploads", json=body, headers=LA1)
    assert r.status == 503 and r.headers["Retry-After"]

    replica.client().execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
    wait_until(lambda: in_sync(primary, [replica]))
    for _ in range(50):  # the first attempt's lease may still be held: 503 until it is released or completed
        r = await client.post("/v1/uploads", json=body, headers=LA1)
        if r.status == 200:
            break
        assert r.status in (409, 503)
        time.sleep(0.1)
    assert r.status == 200
    report = await r.json()
    assert report["accepted"] == 2
    keys = Keys(key_prefix, HASH_KEY.encode())
    for node in (primary, replica):
        assert node.client().hlen(keys.la_ids("LA001")) == 2
        assert node.client().get(keys.la_sequence("LA001")) == "7"
    again = await client.post("/v1/uploads", json=body, headers=LA1)  # a re-send: the stored report
    assert again.status == 200 and (await again.json()) == report


async def test_the_service_finds_the_primary_through_sentinel_and_follows_a_failover(
    aiohttp_client: Any, make_settings: Any, key_prefix: str, nodes: list[Node], tmp_path: Path
) -> None:
    primary, replica = nodes
    sentinel = Node(tmp_path / "sentinel", sentinel=primary.port, quorum=1).start()
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{MASTER}"
        settings = make_settings(redis_url=url, redis_min_replicas=1, relays=False)
        client = await aiohttp_client(create_app(settings))
        assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
        assert (await client.get(CARETEAM, headers={**ED, "TraceID": "before"})).status == 200
        assert child_state(primary, key_prefix) == (1, 1)

        wait_until(lambda: sentinel.client().execute_command("SENTINEL", "REPLICAS", MASTER))
        assert sentinel.client().execute_command("SENTINEL", "FAILOVER", MASTER)
        wait_until(lambda: replica.role() == "master" and primary.role() == "slave", timeout=30)
        access_sha = replica.client().script_load(source("access"))
        replica.client().script_flush()  # the new primary has not run the service's scripts
        assert replica.client().script_exists(access_sha) == [False]

        started = time.monotonic()
        while True:  # the first requests after a failover may meet the demoted primary: 503, then it follows
            r = await client.get(CARETEAM, headers={**ED, "TraceID": "after"})
            if r.status == 200 or time.monotonic() - started > 10:
                break
            time.sleep(0.1)
        assert r.status == 200
        assert child_state(replica, key_prefix) == (2, 2)  # written on the new primary
        assert replica.client().script_exists(access_sha) == [True]  # and its script loaded there
        wait_until(lambda: child_state(primary, key_prefix) == (2, 2))  # the old primary follows as a replica
    finally:
        sentinel.stop()


async def test_writes_to_a_fenced_or_demoted_primary_are_503_not_500(
    aiohttp_client: Any, make_settings: Any, nodes: list[Node]
) -> None:
    """Without Sentinel to follow, a primary fenced by min-replicas-to-write (NOREPLICAS) and a demoted one
    (READONLY) are an unavailable store, on the pool's path and on the look-up's."""
    primary, replica = nodes
    client = await aiohttp_client(create_app(make_settings(redis_url=primary.url, relays=False)))
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    primary.client().config_set("min-replicas-to-write", 2)  # it has one
    r = await client.put("/v1/records/CASE-2", json=record("CASE-2"), headers=LA1)
    assert r.status == 503 and r.headers["Retry-After"]
    assert (await client.get(CARETEAM, headers={**ED, "TraceID": "fenced"})).status == 503
    primary.client().config_set("min-replicas-to-write", 0)
    replica.client().execute_command("REPLICAOF", "NO", "ONE")
    primary.client().execute_command("REPLICAOF", "127.0.0.1", str(replica.port))  # demoted
    r = await client.put("/v1/records/CASE-2", json=record("CASE-2"), headers=LA1)
    assert r.status == 503 and r.headers["Retry-After"]
    assert (await client.get(CARETEAM, headers={**ED, "TraceID": "demoted"})).status == 503
