"""Fixtures every chaos scenario shares: a private embedded Redis (AOF, as shipped) that a scenario may kill."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cpis_bridge.store.embedded import EmbeddedRedis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
