"""Shared fixtures: one real Redis per test process (embedded, or CPIS_TEST_REDIS_URL), a key prefix per test,
and the app built by create_app, served over real HTTP by pytest-aiohttp. Helpers and constants live in
tests/support (import them from there, never from this file)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from cpis_bridge.config import Settings
from cpis_bridge.store.embedded import EmbeddedRedis
from tests.support.world import DEV_SECRET, HASH_KEY, REGISTRY


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("CPIS_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    prefix = "t" + uuid.uuid4().hex[:12]
    yield prefix
    client = redis_sync.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def make_settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "key_prefix": key_prefix,
            "data_dir": tmp_path / "var",
            "registry": REGISTRY,
            "auth_dev_secret": DEV_SECRET,
            "log_hash_key": HASH_KEY,
            "delivery_first_retry_s": 0.05,
            "delivery_max_backoff_s": 0.5,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings], request: pytest.FixtureRequest) -> Settings:
    """Default settings; a test marked ``no_relays`` runs without the in-process relays (to inspect the queues)."""
    return make_settings(relays=request.node.get_closest_marker("no_relays") is None)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> AsyncIterator[Any]:
    from cpis_bridge.app import create_app

    yield await aiohttp_client(create_app(settings))


@pytest.fixture
async def double() -> AsyncIterator[Any]:
    """A FHIR R4 server double (tests/support/fhir_double.py) on loopback, able to fail on purpose."""
    from tests.support.fhir_double import FhirDouble

    d = FhirDouble()
    await d.start()
    yield d
    await d.stop()
