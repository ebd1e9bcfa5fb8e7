"""The store under faults and at rest, each against a private embedded Redis of the test's own: frozen (SIGSTOP)
requests answer 503 with Retry-After within their deadline and /readyz reports the stall; stopped, 503; its data
directory and every file in it are the owner's only."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from cpis_bridge.app import create_app
from cpis_bridge.bootstrap import dev_secret, hash_key
from cpis_bridge.config import Settings
from cpis_bridge.store.embedded import EmbeddedRedis
from tests.support.polling import wait_for_async
from tests.support.world import ED, LA1, record

CARETEAM = "/fhir/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)  # never leave it frozen
        server.stop()


async def timed(client: Any, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    r = await client.request(method, path, **kw)
    await r.read()
    return r.status, dict(r.headers), time.monotonic() - started


async def test_a_frozen_store_answers_503_within_the_deadline_and_readyz_reports_it(
    aiohttp_client: Any, make_settings: Any, own_redis: EmbeddedRedis
) -> None:
    settings: Settings = make_settings(redis_url=own_redis.url, api_request_deadline_s=1.5)
    assert settings.request_deadline_s == 2.5 and settings.redis_timeout_s < settings.request_deadline_s
    client = await aiohttp_client(create_app(settings))
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    status, _, _ = await timed(client, "GET", CARETEAM, headers={**ED, "TraceID": "before-the-stall"})
    assert status == 200
    assert own_redis.process is not None
    pid = own_redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        # Look-ups in flight together, as under load: each answers by its deadline, not after 10 s + a retry.
        answers = await asyncio.gather(
            *(timed(client, "GET", CARETEAM, headers={**ED, "TraceID": f"stalled-{i}"}) for i in range(8))
        )
        for status, headers, elapsed in answers:
            assert status == 503 and headers.get("Retry-After") == "1", (status, headers)
            assert elapsed < settings.request_deadline_s + 0.75, elapsed
        status, headers, elapsed = await timed(
            client,
            "POST",
            "/cds-services/cpis-patient-view",
            headers=ED,
            json={
                "hook": "patient-view",
                "hookInstance": "h-1",
                "context": {"userId": "PractitionerRole/1", "patientId": "p1"},
                "prefetch": {
                    "patient": {
                        "resourceType": "Patient",
                        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
                    }
                },
            },
        )
        assert status == 503 and headers.get("Retry-After") == "1" and elapsed < settings.request_deadline_s + 0.75
        status, headers, elapsed = await timed(client, "GET", "/v1/records/CASE-1", headers=LA1)
        assert status == 503 and headers.get("Retry-After") == "1" and elapsed < 1.5 + 0.75, (status, elapsed)
        status, _, elapsed = await timed(client, "GET", "/readyz")
        assert status == 503 and elapsed < 2.0, (status, elapsed)
    finally:
        os.kill(pid, signal.SIGCONT)

    # Resumed: ready again, and look-ups answer at once.
    async def answers_200(method: str, path: str, **kw: Any) -> bool:
        return (await timed(client, method, path, **kw))[0] == 200

    await wait_for_async(lambda: answers_200("GET", "/readyz"), 15, 0.1, "not ready after the store resumed")
    await wait_for_async(
        lambda: answers_200("GET", CARETEAM, headers={**ED, "TraceID": "after-the-stall"}),
        15,
        0.1,
        "look-ups still fail after the store resumed",
    )


async def test_an_unreachable_store_is_503_with_retry_after(
    aiohttp_client: Any, make_settings: Any, own_redis: EmbeddedRedis
) -> None:
    client = await aiohttp_client(create_app(make_settings(redis_url=own_redis.url, relays=False)))
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    await asyncio.to_thread(own_redis.stop)
    try:
        for method, path, headers in (("GET", "/v1/records/CASE-1", LA1), ("GET", CARETEAM, ED)):
            r = await client.request(method, path, headers=headers)
            assert r.status == 503, await r.text()
            assert r.headers.get("Retry-After") == "1"
    finally:
        await asyncio.to_thread(own_redis.start)
        await client.close()


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def test_the_data_directory_and_every_file_in_it_are_the_owners_only(tmp_path: Path) -> None:
    data = tmp_path / "var"
    # A data directory as an earlier release left it: world-readable directory and files.
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "redis.log").write_text("an earlier run's server log\n")  # the server appends to it
    (data / "redis.log").chmod(0o644)
    (data / "dev-secret").write_text("an-old-dev-secret-0123456789")
    (data / "dev-secret").chmod(0o644)
    old_umask = os.umask(0o022)  # the usual umask: the service must not depend on the caller's
    try:
        settings = Settings(_env_file=None, data_dir=data)  # type: ignore[call-arg]
        assert dev_secret(settings) == "an-old-dev-secret-0123456789"
        hash_key(settings)  # generated on first use
        server = EmbeddedRedis(data)
        server.start()
        try:
            client = redis_sync.Redis(unix_socket_path=str(server.socket_path))
            client.set("k", "v")  # the AOF now holds data
            client.close()
            found = modes(data)
        finally:
            server.stop()
    finally:
        os.umask(old_umask)
    assert {"redis.log", "dev-secret", "log-hash-key", "redis.sock"} <= set(found), found
    assert any(".aof" in name for name in found), found
    for name, mode in found.items():
        path = data / name
        if path.is_dir():
            assert mode == 0o700, (name, oct(mode))
        else:
            assert mode == 0o600, (name, oct(mode))
