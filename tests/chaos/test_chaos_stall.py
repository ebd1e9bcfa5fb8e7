"""`make chaos`: Redis frozen (SIGSTOP) for 30 s under a stream of unscheduled look-ups, then resumed. Every look-up
answers within its deadline (2xx, or 503 with Retry-After while the store is frozen), /readyz reports the stall, and
nothing acknowledged is lost: every access answered 2xx is in the history and its notification is delivered."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.chaos.harness import LoadResult, children, drive_accesses, fault_point, load_children
from tests.chaos.test_chaos import (  # the scenarios' shared fixtures and checks
    ACCESSES,
    CHILDREN,
    assert_nothing_lost,
    receiver,  # noqa: F401 - a fixture
    service,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

FROZEN_S = 30.0
DEADLINE_S = 2.5  # CPIS_REQUEST_DEADLINE_S's default, which the service runs with here
SLACK_S = 1.0  # the client's own queueing on a shared 2-core machine


async def test_redis_frozen_for_30_s_under_load(tmp_path, redis_server, receiver):  # noqa: F811
    nhs = children(CHILDREN)
    svc = service(tmp_path, "a", redis_server.url, receiver).start()
    pid = redis_server.process.pid
    try:
        async with aiohttp.ClientSession() as s:
            await load_children(s, svc.url, nhs)
        result = LoadResult()
        load = asyncio.create_task(
            drive_accesses([svc.url], nhs, ACCESSES, deadline_s=240, pause_s=0.01, result=result)
        )
        at_fault = await fault_point(result, ACCESSES)
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                await asyncio.sleep(3.0)
                async with s.get(svc.url + "/readyz") as r:
                    ready_while_frozen = r.status
                answered_while_frozen = len(result.answers)
                await asyncio.sleep(FROZEN_S - (time.monotonic() - frozen_at))
                answered_while_frozen = len(result.answers) - answered_while_frozen
        finally:
            os.kill(pid, signal.SIGCONT)
        await load
        assert ready_while_frozen == 503, "/readyz did not report the stall"
        assert answered_while_frozen > 20, "look-ups stopped being answered while the store was frozen"
        assert len(result.acknowledged) + result.failed == ACCESSES > at_fault
        statuses = {status for status, _ in result.answers}
        assert statuses <= {200, 503}, f"answers other than 2xx or 503: {statuses}"
        assert 503 in statuses, "the stall never reached a look-up"
        slowest = max(seconds for _, seconds in result.answers)
        print(
            f"frozen {FROZEN_S:.0f} s at answer {at_fault}: {len(result.acknowledged)} acknowledged, "
            f"{sum(s == 503 for s, _ in result.answers)} answered 503, slowest answer {slowest:.2f} s"
        )
        assert slowest <= DEADLINE_S + SLACK_S, f"a look-up took {slowest:.2f} s"
        await assert_nothing_lost(receiver, redis_server.url, nhs, result)
    finally:
        os.kill(pid, signal.SIGCONT)
        svc.stop()
