"""Losing the Redis primary (`make chaos`): one primary, two replicas and three Sentinels on loopback, started from
one server binary, the service on `redis+sentinel://` with CPIS_REDIS_MIN_REPLICAS=1 and the primary fenced by
min-replicas-to-write. kill -9 of the primary amid >= 1,000 accesses and a running upload: Sentinel promotes a
replica, the service follows, and every acknowledged access, record and notification is on the new primary and
reaches the LA's webhook under exactly one notification id; the old primary rejoins as a replica. The primary frozen
(SIGSTOP) for 20 s through a failover: nothing it took in between was acknowledged."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis as redis_sync

from cpis_bridge.store.keys import Keys
from tests.chaos.harness import ED, LA1, LoadResult, children, drive_accesses, fault_point, load_children
from tests.chaos.test_chaos import history_traces
from tests.support.polling import eventually
from tests.support.receivers import Receiver, webhook_block, webhook_secret, write_registry
from tests.support.redis_ha import MASTER, Node, in_sync, server_binary, wait_until
from tests.support.service import ServiceProcess
from tests.support.world import HASH_KEY, NHS_SYSTEM, record

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        server_binary() is None, reason="no redis-server/valkey-server binary (apt-get install redis-server)"
    ),
]

ACCESSES = 1200
CHILDREN = 1000
UPLOAD = 4000  # records in the upload running when the primary dies
PREFIX = "chaos"
DOWN_AFTER_MS = 1000  # Sentinel's down-after-milliseconds here (production: a few seconds)
FENCE = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "5")


class Cluster:
    def __init__(self, root: Path) -> None:
        primary = Node(root / "n0", extra=FENCE).start()
        self.data = [primary] + [Node(root / f"n{i}", replica_of=primary.port, extra=FENCE).start() for i in (1, 2)]
        wait_until(lambda: in_sync(primary, self.data[1:]))
        self.sentinels = [
            Node(root / f"s{i}", sentinel=primary.port, quorum=2, down_after_ms=DOWN_AFTER_MS).start() for i in range(3)
        ]
        wait_until(lambda: all(len(self.sentinel_view(s)) >= 2 for s in self.sentinels), timeout=30)

    @staticmethod
    def sentinel_view(sentinel: Node) -> list[Any]:
        client = sentinel.client(timeout=1)
        sentinels = client.execute_command("SENTINEL", "SENTINELS", MASTER)
        replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER)
        return [*sentinels, *replicas] if len(replicas) == 2 else []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{MASTER}"

    def primary(self) -> Node:
        """The data node the Sentinels name as primary."""
        for sentinel in self.sentinels:
            try:
                _, port = sentinel.client(timeout=1).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            except Exception:
                continue
            return next(n for n in self.data if n.port == int(port))
        raise AssertionError("no Sentinel answered")

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "redis")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def receiver():
    r = await Receiver(webhook_secret()).start()
    yield r
    await r.stop()


def service(tmp_path: Path, cluster: Cluster, receiver: Receiver) -> ServiceProcess:
    registry = write_registry(tmp_path / "registry.yaml", {"LA001": webhook_block(receiver.url)})
    env = {
        "CPIS_REGISTRY": str(registry),
        "LA001_WEBHOOK_SECRET": receiver.secret,
        "CPIS_DELIVERY_FIRST_RETRY_S": "0.5",
        "CPIS_DELIVERY_MAX_BACKOFF_S": "2",
        "CPIS_REDIS_MIN_REPLICAS": "1",
        "CPIS_LOG_LEVEL": "WARNING",
    }
    return ServiceProcess(tmp_path / "svc", redis_url=cluster.url, key_prefix=PREFIX, env=env).start()


async def upload_until_applied(base: str, sequence: int, records: list[dict[str, Any]], timeout: float = 90) -> float:
    """Send one upload, and the same again (the same sequence: idempotent) until it is applied; returns when."""
    body = orjson.dumps({"sequence": sequence, "mode": "delta", "recordCount": len(records), "records": records})
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        while True:
            try:
                async with s.post(
                    f"{base}/v1/uploads", data=body, headers={**LA1, "Content-Type": "application/json"}
                ) as r:
                    if r.status == 200:
                        assert (await r.json())["accepted"] == len(records)
                        return time.monotonic()
                    assert r.status in (409, 503), await r.text()
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the upload was never applied"
            await asyncio.sleep(0.5)


async def first_success_after(base: str, nhs: str, timeout: float = 30) -> float:
    """Seconds until a fresh recorded look-up is acknowledged again."""
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for i in range(10_000):
            try:
                async with s.get(
                    f"{base}/fhir/CareTeam",
                    params={"patient:identifier": f"{NHS_SYSTEM}|{nhs}"},
                    headers={**ED, "TraceID": f"probe-{i}"},
                ) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() - started < timeout, "the service never wrote again"
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


async def assert_all_kept(receiver: Receiver, primary: Node, nhs: list[str], result: LoadResult) -> dict[str, int]:
    """Every acknowledged access is on ``primary`` and reached the webhook under exactly one notification id."""
    assert len(result.acknowledged) + result.failed >= 1000, "the scenario must drive at least 1,000 accesses"
    acknowledged = set(result.acknowledged)
    assert acknowledged, "no access was acknowledged: nothing was tested"
    kept = history_traces(primary.url, nhs)
    missing = acknowledged - kept
    assert not missing, f"{len(missing)} acknowledged accesses missing on the new primary"
    delivered = await eventually(lambda: acknowledged <= set(receiver.unique_source_events()), 120, step=0.2)
    assert delivered, f"{len(acknowledged - set(receiver.unique_source_events()))} acknowledged accesses never notified"
    ids_by_event: dict[str, set[str]] = defaultdict(set)
    for n in receiver.received:
        ids_by_event[n["access"]["sourceEventId"]].add(n["id"])
    twice = {e for e in acknowledged if len(ids_by_event[e]) != 1}
    assert not twice, f"{len(twice)} accesses notified under more than one notification id"
    # The relay delivers only what replicas hold (store/outbox.py load): no notification for an access the failover
    # lost (one whose request was answered 503 while the primary died or froze).
    phantom = set(ids_by_event) - kept
    assert not phantom, f"{len(phantom)} notifications for accesses that are not on the new primary"
    assert receiver.bad_signatures == 0
    return {
        "acknowledged": len(acknowledged),
        "failed": result.failed,
        "notifications": len(receiver.unique_ids()),
        "redelivered": len(receiver.received) - len(receiver.unique_ids()),
    }


def rejoined_as_replica(old: Node, primary: Node) -> bool:
    info = old.client(timeout=1).info("replication")
    return info["role"] == "slave" and int(info["master_port"]) == primary.port and info["master_link_status"] == "up"


async def test_kill9_primary_during_accesses_and_an_upload(tmp_path: Path, cluster: Cluster, receiver: Receiver):
    nhs = children(CHILDREN)
    svc = service(tmp_path, cluster, receiver)
    try:
        async with aiohttp.ClientSession() as s:
            await load_children(s, svc.url, nhs)
        result = LoadResult()
        load = asyncio.create_task(
            drive_accesses([svc.url], nhs, ACCESSES, deadline_s=120, pause_s=0.01, result=result)
        )
        await fault_point(result, ACCESSES)
        uploaded = [record(f"U{i}", n) for i, n in enumerate(children(UPLOAD, start=CHILDREN))]
        upload = asyncio.create_task(upload_until_applied(svc.url, 2, uploaded))
        await asyncio.sleep(0.3)  # the upload is streaming and applying
        old = cluster.primary()
        killed_at = time.monotonic()
        old.kill()
        recovery = await first_success_after(svc.url, nhs[0])
        new = await asyncio.to_thread(cluster.primary)
        assert new is not old
        assert recovery < 10 + DOWN_AFTER_MS / 1000, f"the service followed the failover after {recovery:.1f} s"
        await load
        applied_at = await upload
        await asyncio.to_thread(old.start)  # its AOF back; Sentinel turns it into a replica of the new primary
        figures = await assert_all_kept(receiver, new, nhs, result)
        keys = Keys(PREFIX, HASH_KEY.encode())
        assert new.client().hlen(keys.la_ids("LA001")) == CHILDREN + UPLOAD  # every record of both uploads
        # Against the primary of the moment: on a loaded machine a down-after of 1 s can fail over once more.
        await asyncio.to_thread(wait_until, lambda: rejoined_as_replica(old, cluster.primary()), 60)
        await asyncio.to_thread(wait_until, lambda: in_sync(cluster.primary(), [old]), 30)
        print(  # the scenario's figures, for the README
            f"\nfailover kill -9: service writing again {recovery:.2f} s after the kill; upload applied "
            f"{applied_at - killed_at:.2f} s after it; {figures}"
        )
    finally:
        svc.stop()


async def test_frozen_primary_acknowledges_nothing_it_took_while_frozen(
    tmp_path: Path, cluster: Cluster, receiver: Receiver
):
    nhs = children(CHILDREN)
    svc = service(tmp_path, cluster, receiver)
    old = cluster.primary()
    try:
        async with aiohttp.ClientSession() as s:
            await load_children(s, svc.url, nhs)
        result = LoadResult()
        load = asyncio.create_task(
            drive_accesses([svc.url], nhs, ACCESSES, deadline_s=150, pause_s=0.02, result=result)
        )
        await fault_point(result, ACCESSES)
        old.freeze()
        try:
            recovery = await first_success_after(svc.url, nhs[0])
            new = await asyncio.to_thread(cluster.primary)
            assert new is not old
            await asyncio.sleep(max(0.0, 20 - recovery))
        finally:
            old.thaw()  # it runs whatever it had received, then Sentinel demotes it
        # Fenced: its replicas' last acknowledgements are 20 s old (min-replicas-max-lag 5), so it takes no write.
        with pytest.raises(redis_sync.ResponseError, match=r"NOREPLICAS|READONLY"):
            old.client().set(f"{PREFIX}:probe", "written while it was cut off")
        await load
        figures = await assert_all_kept(receiver, new, nhs, result)
        # Against the primary of the moment: on a loaded machine a down-after of 1 s can fail over once more.
        await asyncio.to_thread(wait_until, lambda: rejoined_as_replica(old, cluster.primary()), 60)
        await asyncio.to_thread(wait_until, lambda: in_sync(cluster.primary(), [old]), 30)
        print(f"\nfailover SIGSTOP 20 s: service writing again {recovery:.2f} s after the freeze; {figures}")
    finally:
        svc.stop()
