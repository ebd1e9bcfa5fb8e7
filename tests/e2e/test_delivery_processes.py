"""Relays in real `cpis-bridge serve` processes sharing one Redis: the work is shared, no notification is lost or
duplicated; under the `chaos` marker, a receiver out for a minute and a relay process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cpis_bridge.app import create_app
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import NhsNumber, iter_test_numbers
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.access import LookupRequest
from cpis_bridge.web.state import REGISTRY, SERVICES
from tests.support.polling import wait_for, wait_for_async
from tests.support.receivers import Receiver, write_registry
from tests.support.service import ServiceProcess
from tests.support.world import record


async def delivered(svc: ServiceProcess) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{svc.url}/metrics") as r:
        text = await r.text()
    m = re.search(r'cpis_deliveries_total\{channel="webhook",outcome="delivered"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
async def setup(
    make_settings: Callable[..., Any], redis_url: str, key_prefix: str, tmp_path: Path, aiohttp_client: Any
) -> AsyncIterator[dict[str, Any]]:
    receiver = await Receiver().start()
    registry = write_registry(
        tmp_path / "registry.yaml", {"LA001": {"webhook": {"url": receiver.url, "secretEnv": "LA001_WEBHOOK_SECRET"}}}
    )
    env = {
        "CPIS_REDIS_URL": redis_url,
        "CPIS_KEY_PREFIX": key_prefix,
        "CPIS_REGISTRY": str(registry),
        "CPIS_LOG_LEVEL": "WARNING",
        "LA001_WEBHOOK_SECRET": receiver.secret,
        "CPIS_DELIVERY_FIRST_RETRY_S": "0.05",
        "CPIS_DELIVERY_MAX_BACKOFF_S": "0.5",
        "CPIS_RELAY_CLAIM_IDLE_S": "3",
        "CPIS_RELAY_RECLAIM_INTERVAL_S": "0.5",
        "CPIS_SHUTDOWN_GRACE_S": "1",
        "CPIS_DELIVERY_TIMEOUT_S": "2",
        "CPIS_DELIVERY_BREAKER_COOLDOWN_S": "0.5",
    }
    # The accesses are made in-process (relays off) against the same Redis and prefix.
    client = await aiohttp_client(create_app(make_settings(registry=registry, relays=False)))
    services: list[ServiceProcess] = []
    state = {"receiver": receiver, "env": env, "app": client.app, "services": services, "tmp": tmp_path}
    try:
        yield state
    finally:
        for s in services:
            s.stop()
        await receiver.stop()


async def start(state: dict[str, Any], name: str, **env: str) -> ServiceProcess:
    """A `cpis-bridge serve` sharing the test's Redis and key prefix, ready (the receiver keeps answering meanwhile)."""
    svc = ServiceProcess(state["tmp"] / name, env={**state["env"], **env})
    state["services"].append(svc)
    return await svc.start_async(timeout=60)  # start-up on a loaded machine; not what these tests measure


async def make_accesses(app: web.Application, n: int, *, children: int = 50, rate: float | None = None) -> list[str]:
    """``n`` accesses spread over ``children`` flagged children; returns their access ids."""
    numbers = [str(x) for x, _ in zip(iter_test_numbers(), range(children), strict=False)]
    la = AuditContext(Principal("u-la", Role.LOCAL_AUTHORITY, "LA001"))
    for i, nhs in enumerate(numbers):
        await app[SERVICES].records.put(la, "LA001", f"C-{i}", record(f"C-{i}", nhs))
    ed = AuditContext(Principal("u-ed", Role.CARE_SETTING, "RXX01", name="Dr Test", role_code="R8000"))
    setting = app[REGISTRY].care_settings["RXX01"]

    async def one(i: int) -> str:
        out = await app[SERVICES].access.lookup(
            ed,
            LookupRequest(
                nhs=NhsNumber(numbers[i % children]), care_setting=setting, kind="careteam", source_event_id=f"ev-{i}"
            ),
        )
        assert out.status == 1
        return str(out.access_id)

    ids: list[str] = []
    step = 50
    for first in range(0, n, step):
        started = time.monotonic()
        ids += await asyncio.gather(*(one(i) for i in range(first, min(first + step, n))))
        if rate:
            await asyncio.sleep(max(step / rate - (time.monotonic() - started), 0))
    return ids


def access_ids(receiver: Receiver) -> list[str]:
    return [bodies[0]["access"]["id"] for bodies in receiver.accepted.values()]


@pytest.mark.parametrize("n", [pytest.param(200), pytest.param(1000, marks=[pytest.mark.chaos])])
async def test_two_service_processes_share_the_work_exactly_once(setup: dict[str, Any], n: int) -> None:
    receiver: Receiver = setup["receiver"]
    a, b = await asyncio.gather(start(setup, "a"), start(setup, "b"))
    ids = await make_accesses(setup["app"], n, children=20)
    await wait_for(lambda: len(receiver.accepted) >= n, timeout=60)

    async def counted() -> bool:  # the receiver holds each one before its relay has read the answer and counted it
        return await delivered(a) + await delivered(b) >= n

    await wait_for_async(counted, timeout=30, what="the relays did not count every delivery")
    assert sorted(access_ids(receiver)) == sorted(ids)
    assert len(receiver.ids()) == n, "duplicate deliveries"
    assert receiver.bad_signatures == 0
    counts = [await delivered(a), await delivered(b)]
    assert sum(counts) == n and min(counts) > 0, counts


async def outage(setup: dict[str, Any], seconds: float, mode: str, n: int) -> None:
    """A receiver refusing connections / answering 500 / too slow for ``seconds`` from a random point."""
    receiver: Receiver = setup["receiver"]
    await start(setup, "a")
    port = receiver.port
    fault_at = random.uniform(0.1, 0.6) * n

    async def fault() -> None:
        await wait_for(lambda: len(receiver.accepted) >= fault_at, timeout=120, step=0.01)
        if mode == "refused":
            await receiver.stop()
        elif mode == "500":
            receiver.behaviour = lambda _n, _r: 500
        else:
            receiver.slow_s = 3.0
        await asyncio.sleep(seconds)
        if mode == "refused":
            receiver.port = port
            await receiver.start()
        receiver.behaviour = None
        receiver.slow_s = 0

    faulty = asyncio.create_task(fault())
    ids = await make_accesses(setup["app"], n, rate=200)
    await asyncio.wait_for(faulty, timeout=seconds + 60)
    await wait_for(lambda: len(receiver.accepted) >= n, timeout=30)
    assert sorted(access_ids(receiver)) == sorted(ids), "notifications lost"
    # retries of one notification are spaced by backoff (first retry >= half the first interval, then growing);
    # once the endpoint's breaker opens, the rest wait without attempts, so a notification may be tried only twice
    by_id: dict[str, list[float]] = {}
    for a in receiver.attempts:
        by_id.setdefault(str(a.id), []).append(a.at)
    retried = [t for t in by_id.values() if len(t) >= 2]
    if mode == "500":
        assert retried, "the fault caused no retries"
    for times in retried:
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 0.05 / 2 - 0.01, gaps


@pytest.mark.parametrize("mode", ["500", pytest.param("refused", marks=[pytest.mark.chaos])])
async def test_short_receiver_outage_loses_nothing(setup: dict[str, Any], mode: str) -> None:
    await outage(setup, 1.5, mode, 200)


@pytest.mark.chaos
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["refused", "500", "slow"])
async def test_receiver_out_for_a_minute_gets_everything_after(setup: dict[str, Any], mode: str) -> None:
    await outage(setup, 60.0, mode, 1000)


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_kill_9_of_one_relay_process_loses_nothing(setup: dict[str, Any]) -> None:
    receiver: Receiver = setup["receiver"]
    a, _ = await asyncio.gather(start(setup, "a"), start(setup, "b"))
    receiver.slow_s = 0.0
    kill_at = random.randint(100, 700)

    async def killer() -> None:
        await wait_for(lambda: len(receiver.accepted) >= kill_at, timeout=120, step=0.005)
        a.send(signal.SIGKILL)

    k = asyncio.create_task(killer())
    ids = await make_accesses(setup["app"], 1000, rate=400)
    await asyncio.wait_for(k, timeout=30)
    await wait_for(lambda: len(receiver.accepted) >= 1000, timeout=60)
    assert sorted(access_ids(receiver)) == sorted(ids)
