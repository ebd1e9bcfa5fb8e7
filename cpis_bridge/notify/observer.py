"""Delivery metrics: counters per (channel, outcome) bound once, latency, and the gauges refreshed from the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from prometheus_client import Counter, Histogram

from cpis_bridge.core.ports import ChannelStats
from cpis_bridge.metrics import CHANNELS, Metrics

log = logging.getLogger("cpis_bridge.delivery")


class MetricsObserver:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counts: dict[tuple[str, str], Counter] = {
            (ch, o): metrics.deliveries.labels(ch, o) for ch in CHANNELS for o in ("delivered", "retried", "dead")
        }
        self._latency: dict[str, Histogram] = {ch: metrics.delivery_latency.labels(ch) for ch in CHANNELS}

    def count(self, channel: str, outcome: str) -> None:
        child = self._counts.get((channel, outcome)) or self.metrics.deliveries.labels(channel, outcome)
        child.inc()

    def latency(self, channel: str, seconds: float) -> None:
        self._latency[channel].observe(seconds)

    def endpoints(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Expose every (channel, LA) endpoint's breaker as closed from the start, so dashboards see it."""
        for channel, la in pairs:
            self.metrics.delivery_breaker_open.labels(channel, la).set(0)
            for state in ("open", "half-open", "closed"):
                self.metrics.delivery_breaker_transitions.labels(channel, la, state)

    def breaker(self, channel: str, la: str, state: str) -> None:
        self.metrics.delivery_breaker_open.labels(channel, la).set(0 if state == "closed" else 1)
        self.metrics.delivery_breaker_transitions.labels(channel, la, state).inc()

    def gauges(self, stats: Mapping[str, ChannelStats]) -> None:
        for ch, s in stats.items():
            self.metrics.delivery_pending.labels(ch).set(s.pending + s.retrying)
            self.metrics.delivery_oldest.labels(ch).set(s.oldest_pending_s)
            self.metrics.delivery_dead.labels(ch).set(s.dead)


async def refresh_gauges(
    observer: MetricsObserver,
    stats: Callable[[], Awaitable[Mapping[str, ChannelStats]]],
    interval_s: float,
    stop: asyncio.Event,
) -> None:
    """Keep the pending/oldest/dead gauges current (every process reports the shared outbox). Ends when ``stop`` is
    set: a cancel alone can be swallowed by a Redis call in flight (Python 3.11), which would leave it looping."""
    while not stop.is_set():
        try:
            observer.gauges(await stats())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery.gauges_failed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
