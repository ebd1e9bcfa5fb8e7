"""The Redis monitor keeps cpis_redis_up and cpis_ready current without any /readyz probe: a Redis of the test's own
is stopped (both gauges drop to 0) and started again on its append-only file (both return to 1)."""

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from cpis_bridge.app import create_app, make_monitor
from cpis_bridge.store.embedded import EmbeddedRedis
from tests.support.polling import wait_for_async


async def gauges(client) -> dict[str, float]:
    resp = await client.get("/metrics")
    text = await resp.text()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in ("cpis_redis_up", "cpis_ready")
    }


async def wait_for(client, expected: dict[str, float], timeout: float = 10.0) -> None:
    async def reached() -> bool:
        return await gauges(client) == expected

    await wait_for_async(reached, timeout, 0.05, f"gauges to read {expected}")


async def test_gauges_follow_redis_down_and_up(aiohttp_client, make_settings, tmp_path):
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start()
    client = None
    try:
        app = create_app(make_settings(redis_url=server.url, relays=False), extra_contexts=[make_monitor(0.05)])
        client = await aiohttp_client(app)
        assert await gauges(client) == {"cpis_redis_up": 1.0, "cpis_ready": 1.0}
        await asyncio.to_thread(server.stop)
        await wait_for(client, {"cpis_redis_up": 0.0, "cpis_ready": 0.0})
        await asyncio.to_thread(server.start)
        await wait_for(client, {"cpis_redis_up": 1.0, "cpis_ready": 1.0})
    finally:
        if client is not None:
            await client.close()  # the app stops while its Redis still answers
        await asyncio.to_thread(server.stop)
