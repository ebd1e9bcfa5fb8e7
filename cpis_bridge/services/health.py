"""Store health between probes: the loop keeping the readiness state (and its gauges) current."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from cpis_bridge.core.ports import StoreHealth

PROBE_TIMEOUT_S = 2.0


async def watch_store(
    store: StoreHealth, report: Callable[[bool], None], stop: asyncio.Event, *, interval_s: float
) -> None:
    """Ping the store every ``interval_s`` and ``report`` whether it answered. Ends on the stop event, not on
    cancellation alone: Python 3.11's wait_for can swallow a cancel."""
    while not stop.is_set():
        report(await store.ping(PROBE_TIMEOUT_S))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
