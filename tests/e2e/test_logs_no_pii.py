"""`cpis-bridge serve` as a real subprocess at DEBUG level through the whole flow (records, uploads, audit, errors,
NHS numbers in paths and query strings, /metrics, then a subject-access export): no NHS number or name appears in
any log line, every line is JSON, and request lines carry the route template, request id and TraceID."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEV_SECRET, HASH_KEY, REGISTRY, auth, record

NUMBERS = ["9990000018", "9990000026", "9990000034"]
NAMES = ["Zephyrine", "Quillfeather", "Marguerite Testperson", "Ondine", "Brackwater"]
API_FAMILIES = ["cpis_http_requests_total", "cpis_http_request_duration_seconds", "cpis_accesses_total",
                "cpis_upload_records_total", "cpis_deliveries_total", "cpis_delivery_pending",
                "cpis_delivery_oldest_pending_seconds", "cpis_redis_up"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def forms(number: str) -> list[str]:
    return [number, f"{number[:3]} {number[3:6]} {number[6:]}", f"{number[:3]}-{number[3:6]}-{number[6:]}"]


@pytest.fixture
def service_env(redis_url: str, key_prefix: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPIS_")}
    env.update({
        "CPIS_REDIS_URL": redis_url, "CPIS_KEY_PREFIX": key_prefix, "CPIS_DATA_DIR": str(tmp_path / "var"),
        "CPIS_REGISTRY": str(REGISTRY), "CPIS_AUTH_DEV_SECRET": DEV_SECRET, "CPIS_LOG_HASH_KEY": HASH_KEY,
        "CPIS_LOG_LEVEL": "DEBUG", "CPIS_PORT": str(free_port()), "CPIS_HOST": "127.0.0.1",
    })
    return env


async def wait_until_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the service exited during start-up"
            try:
                async with http.get(base + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the service did not become ready")


async def drive(base: str) -> str:
    """The flow: records PUT/GET/list, uploads (JSON and CSV, with bad rows), the audit trail, error paths."""
    la = auth("local-authority", "LA001", name="Marguerite Testperson", role_code="R0001")
    ops = auth("ops", "OPS", name="Ondine Brackwater")
    person = {"givenName": "Zephyrine", "familyName": "Quillfeather"}
    trace = {"TraceID": "trace-0001", "X-Request-ID": "req-0001"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async def call(method: str, path: str, expect: int | None = None, **kw) -> aiohttp.ClientResponse:
            async with http.request(method, base + path, **kw) as r:
                await r.read()
                if expect is not None:
                    assert r.status == expect, (method, r.status)
                return r

        await call("PUT", "/v1/records/CASE-1", 201, json=record("CASE-1", NUMBERS[0], **person),
                   headers={**la, **trace})
        await call("GET", "/v1/records/CASE-1", 200, headers=la)
        await call("GET", f"/v1/records?nhsNumber={NUMBERS[0]}", 200, headers=la)
        await call("GET", f"/v1/records?nhsNumber={NUMBERS[1][:3]}%20{NUMBERS[1][3:6]}%20{NUMBERS[1][6:]}", 200,
                   headers=la)
        await call("GET", f"/v1/records/{NUMBERS[2]}", 404, headers=la)  # an NHS number where a local id goes
        await call("PUT", "/v1/records/CASE-2", 422, json=record("CASE-2", "9990000019", **person), headers=la)
        upload = {"sequence": 7, "mode": "delta", "records": [
            record("CASE-3", NUMBERS[1], **person), record("CASE-4", "1234567890", **person), {"localId": "X"}]}
        await call("POST", "/v1/uploads", 200, json=upload, headers=la)
        csv_body = ("localId,planType,nhsNumber,dateOfBirth,givenName,familyName,startDate\n"
                    f"CASE-5,CPP,{NUMBERS[2]},2017-01-01,Zephyrine,Quillfeather,2026-01-02\n"
                    "CASE-6,CPP,not-a-number,2017-01-01,Zephyrine,Quillfeather,2026-01-02\n")
        await call("POST", "/v1/uploads", None, data=csv_body,
                   headers={**la, "Content-Type": "text/csv", "Upload-Sequence": "8", "Upload-Mode": "delta"})
        await call("POST", "/v1/uploads", 422, data=b"{not json", headers={**la, "Content-Type": "application/json"})
        await call("GET", f"/v1/admin/audit?nhsNumber={NUMBERS[0]}", 200, headers=ops)
        await call("GET", "/v1/admin/audit?nhsNumber=12345", 422, headers=ops)
        await call("GET", f"/v1/admin/audit?nhsNumber={NUMBERS[0]}", 403, headers=la)
        await call("GET", f"/no/such/{NUMBERS[0]}?nhsNumber={NUMBERS[1]}", 404)
        await call("GET", "/v1/records/CASE-1", 401, headers={"Authorization": "Bearer " + NUMBERS[0]})
        await call("DELETE", "/v1/records/CASE-3", 204, headers=la)
        async with http.get(base + "/metrics") as r:
            assert r.status == 200
            return await r.text()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cpis_bridge", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


async def test_full_flow_logs_hold_no_nhs_number_or_name(service_env):
    base = f"http://127.0.0.1:{service_env['CPIS_PORT']}"
    proc = subprocess.Popen([sys.executable, "-m", "cpis_bridge", "serve"], env=service_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await wait_until_ready(base, proc)
        metrics = await drive(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]

    # /metrics on the running service after the demo flow shows the families of API.md section 8.
    families = {f.name for f in text_string_to_metric_families(metrics)}
    for family in API_FAMILIES:
        assert family.removesuffix("_total") in families, family

    export = run_cli(["export", "--nhs-number", NUMBERS[0]], service_env)
    assert export.returncode == 0, export.stderr
    assert NUMBERS[0] in export.stdout and "Zephyrine" in export.stdout  # the export itself holds them, by design

    logs = {"serve stdout": out.decode(), "serve stderr": err.decode(), "export stderr": export.stderr}
    lines = [(where, line) for where, text in logs.items() for line in text.splitlines() if line.strip()]
    assert len(lines) > 20
    for where, line in lines:
        for number in [*NUMBERS, "9990000019", "1234567890"]:
            for form in forms(number):
                assert form not in line, f"{where}: NHS number in a log line: {line[:300]}"
        for name in NAMES:
            assert name not in line, f"{where}: a name in a log line: {line[:300]}"
        assert not re.search(r"(?<![0-9])999[0-9]{7}(?![0-9])", line), line[:300]

    records = [json.loads(line) for _, line in lines]
    assert any(r["level"] == "debug" and r["event"] == "serve.config" for r in records), "DEBUG logging was on"
    requests = [r for r in records if r.get("event") == "http.request"]
    assert len(requests) >= 15
    assert all("requestId" in r and "route" in r and "path" not in r for r in requests)
    [first] = [r for r in requests if r.get("requestId") == "req-0001"]
    assert first["traceId"] == "trace-0001" and first["route"] == "/v1/records/{localId}" and first["status"] == 201
    assert {"/v1/records", "/v1/uploads", "/v1/admin/audit", "unmatched"} <= {r["route"] for r in requests}
    assert any(r.get("event") == "serve.draining" for r in records)
