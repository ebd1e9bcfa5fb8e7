"""Input the store would refuse is the client's error, never an outage: cursors and dead-letter ids of every malformed
shape answer 400 / 404 (a 503 with Retry-After would send clients into a retry loop), and requests the HTTP parser
rejects are answered by a real `cpis-bridge serve` without an error in its access log and without echoing them."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.service import ServiceProcess
from tests.support.world import LA1, OPS

U64 = 2**64 - 1
BAD_IDS = [
    "99999999999999999999-99999999999999999999",  # 20 digits: past 2^64 - 1
    f"{U64 + 1}-0",
    f"0-{U64 + 1}",
    "1-1\n",
    "1-1\r",
    "\n1-1",
    "1-1 ",
    "1-",
    "-1",
    "1",
    "1--1",
    "１-１",  # fullwidth digits
    "1-1-1",
    "*",
    "$",
    "+",
    "-",
]


def cursor(entry_id: str, version: str = "n1") -> str:
    return base64.urlsafe_b64encode(f"{version}:{entry_id}".encode()).decode().rstrip("=")


@pytest.mark.parametrize("entry_id", BAD_IDS)
async def test_a_cursor_holding_a_malformed_entry_id_is_400(client: Any, entry_id: str) -> None:
    r = await client.get("/v1/notifications", params={"after": cursor(entry_id)}, headers=LA1)
    body = await r.json()
    assert r.status == 400, body
    assert "Retry-After" not in r.headers and body["detail"] == "after is not a valid cursor"


async def test_a_cursor_at_the_last_possible_entry_id_is_an_empty_page(client: Any) -> None:
    r = await client.get("/v1/notifications", params={"after": cursor(f"{U64}-{U64}")}, headers=LA1)
    assert r.status == 200, await r.text()
    assert (await r.json())["notifications"] == []


@pytest.mark.parametrize("entry_id", BAD_IDS)
async def test_a_dead_letter_id_of_a_malformed_shape_is_404(client: Any, entry_id: str) -> None:
    from urllib.parse import quote

    r = await client.post(f"/v1/admin/dead-letters/{quote(entry_id, safe='')}/retry", headers=OPS)
    assert r.status == 404, await r.text()
    assert "Retry-After" not in r.headers


async def test_the_largest_valid_dead_letter_id_is_looked_up(client: Any) -> None:
    r = await client.post(f"/v1/admin/dead-letters/{U64}-{U64}/retry", headers=OPS)
    assert r.status == 404, await r.text()


BAD_REQUESTS = [
    b"G\x01T /v1/records?nhsNumber=9990000018 HTTP/1.1\r\nHost: x\r\n\r\n",  # bad method
    b"GET /v1/records?nhsNumber=9990000018 HTTP/9.9\r\nHost: x\r\n\r\n",  # bad version
    b"GET /v1/records/9990000018 HTTP/1.1\r\nHost: x\r\nBad\x01Header: 9990000018\r\n\r\n",  # bad header name
    b"GET /v1/records/9990000018 HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"9990000018" * 20_000 + b"\r\n\r\n",  # too long
    b"GET /" + b"9990000018" * 2_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line too long
    b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n99900",
    b"GET /v1/records HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n9990000018\r\n",
]


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_requests_the_parser_rejects_are_answered_without_echo_and_logged(tmp_path: Path, redis_url: str) -> None:
    service = ServiceProcess(tmp_path / "svc", redis_url=redis_url, env={"CPIS_LOG_LEVEL": "DEBUG"})
    service.start()
    try:
        for data in BAD_REQUESTS:
            answer = await raw(service.port, data)
            head, _, body = answer.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            assert status in (400, 431), answer[:300]
            assert b"application/problem+json" in head
            assert json.loads(body)["status"] == status
            assert b"9990000018" not in answer
        # The service still answers normally afterwards.
        assert service.status("/healthz") == 200
    finally:
        service.stop()
    out = service.output()
    assert "Error in logging" not in out and "AssertionError" not in out and "Traceback" not in out, out[-3000:]
    assert "9990000018" not in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rejected = [r for r in lines if r.get("event") == "http.request" and r.get("status") in (400, 431)]
    assert len(rejected) >= len(BAD_REQUESTS) - 1, [r.get("event") for r in lines]  # a chunked error may only close
