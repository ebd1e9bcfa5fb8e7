"""`cpis-bridge serve` as a real subprocess at DEBUG level through the whole flow (records, uploads, audit, errors,
NHS numbers in paths and query strings, /metrics, then a subject-access export): no NHS number or name appears in
any log line, every line is JSON, and request lines carry the route template, request id and TraceID."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.polling import free_port, wait_ready_async
from tests.support.world import DEV_SECRET, HASH_KEY, REGISTRY, auth, record

NUMBERS = ["9990000018", "9990000026", "9990000034"]
NAMES = ["Zephyrine", "Quillfeather", "Marguerite Testperson", "Ondine", "Brackwater"]
API_FAMILIES = [
    "cpis_http_requests_total",
    "cpis_http_request_duration_seconds",
    "cpis_accesses_total",
    "cpis_upload_records_total",
    "cpis_deliveries_total",
    "cpis_delivery_pending",
    "cpis_delivery_oldest_pending_seconds",
    "cpis_redis_up",
]


def forms(number: str) -> list[str]:
    return [number, f"{number[:3]} {number[3:6]} {number[6:]}", f"{number[:3]}-{number[3:6]}-{number[6:]}"]


@pytest.fixture
def service_env(redis_url: str, key_prefix: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPIS_")}
    env.update(
        {
            "CPIS_REDIS_URL": redis_url,
            "CPIS_KEY_PREFIX": key_prefix,
            "CPIS_DATA_DIR": str(tmp_path / "var"),
            "CPIS_REGISTRY": str(REGISTRY),
            "CPIS_AUTH_DEV_SECRET": DEV_SECRET,
            "CPIS_LOG_HASH_KEY": HASH_KEY,
            "CPIS_LOG_LEVEL": "DEBUG",
            "CPIS_PORT": str(free_port()),
            "CPIS_HOST": "127.0.0.1",
        }
    )
    return env


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

        await call(
            "PUT", "/v1/records/CASE-1", 201, json=record("CASE-1", NUMBERS[0], **person), headers={**la, **trace}
        )
        await call("GET", "/v1/records/CASE-1", 200, headers=la)
        await call("GET", f"/v1/records?nhsNumber={NUMBERS[0]}", 200, headers=la)
        await call(
            "GET", f"/v1/records?nhsNumber={NUMBERS[1][:3]}%20{NUMBERS[1][3:6]}%20{NUMBERS[1][6:]}", 200, headers=la
        )
        await call("GET", f"/v1/records/{NUMBERS[2]}", 404, headers=la)  # an NHS number where a local id goes
        await call("PUT", "/v1/records/CASE-2", 422, json=record("CASE-2", "9990000019", **person), headers=la)
        upload = {
            "sequence": 7,
            "mode": "delta",
            "records": [
                record("CASE-3", NUMBERS[1], **person),
                record("CASE-4", "1234567890", **person),
                {"localId": "X"},
            ],
        }
        await call("POST", "/v1/uploads", 200, json=upload, headers=la)
        csv_body = (
            "localId,planType,nhsNumber,dateOfBirth,givenName,familyName,startDate\n"
            f"CASE-5,CPP,{NUMBERS[2]},2017-01-01,Zephyrine,Quillfeather,2026-01-02\n"
            "CASE-6,CPP,not-a-number,2017-01-01,Zephyrine,Quillfeather,2026-01-02\n"
        )
        await call(
            "POST",
            "/v1/uploads",
            None,
            data=csv_body,
            headers={**la, "Content-Type": "text/csv", "Upload-Sequence": "8", "Upload-Mode": "delta"},
        )
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
    return subprocess.run(
        [sys.executable, "-m", "cpis_bridge", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_full_flow_logs_hold_no_nhs_number_or_name(service_env):
    base = f"http://127.0.0.1:{service_env['CPIS_PORT']}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpis_bridge", "serve"], env=service_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        await wait_ready_async(base, proc, timeout=60)
        metrics = await drive(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]

    # /metrics on the running service after the demo flow shows the families of docs/contract.md §8.
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


# -- every form of a number the service accepts, everywhere a request can carry it --------------------------------

FUZZED = "9990000026"


def encoded_forms(n: str) -> list[str]:
    """Every way the service accepts (NhsNumber.parse drops spaces and hyphens; HTTP and JSON decode the rest)."""
    pct = "".join(f"%3{d}" for d in n)
    return [
        n,
        f"{n[:3]} {n[3:6]} {n[6:]}",
        f"{n[:3]}-{n[3:6]}-{n[6:]}",
        f"{n[:3]}%20{n[3:6]}%20{n[6:]}",
        f"{n[:3]}+{n[3:6]}+{n[6:]}",
        f"{n[:3]}%2D{n[3:6]}%2d{n[6:]}",
        pct,
        pct.lower(),
        " ".join(n),
        "-".join(n),
        f"{n[:2]}%39 -{n[3:5]}%20%2D{n[5:]}",  # mixed
        f"\x01{n}",
        f"\x1f{n}",
        f"\t{n}",
        f"CASE{n}X",
        f"{n}\x7f",
    ]


def json_escaped(n: str) -> list[str]:
    return [
        "".join(f"\\u003{d}" for d in n),
        f"{n[:3]}\\u0020{n[3:6]}\\u002d{n[6:]}",
        f"\\u0001{n}",
        "".join(f"\\u003{d}" if i % 2 else d for i, d in enumerate(n)),
    ]


def decoded_views(line: str) -> list[str]:
    """The line as a reader could decode it: raw, JSON-decoded, percent-decoded, unicode escapes undone."""
    from urllib.parse import unquote, unquote_plus

    views = [line]
    try:
        views.append(json.dumps(json.loads(line), ensure_ascii=False))
    except ValueError:
        pass
    out = []
    for v in views:
        for u in (v, unquote(v), unquote_plus(v)):
            u = re.sub(r"\\+u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), u)
            out.append(re.sub(r"[ +\-]", "", u))
    return out


def raw_requests(forms_: list[str]) -> list[bytes]:
    """Requests the HTTP parser rejects, each carrying the number in its request line or a header."""
    out = []
    for f in forms_[:6]:
        b = f.encode("latin-1", "replace")
        out += [
            b"G\x01T /v1/records?nhsNumber=" + b + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /fhir/CareTeam?patient:identifier=x|" + b + b" HTTP/9.9\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTraceID: \x01" + b + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-" + b + b"\x01: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b * 14_000 + b"\r\n\r\n",
        ]
    return out


async def fuzz(base: str, port: int) -> None:
    la = auth("local-authority", "LA001")
    ed = auth("care-setting", "RXX01")
    ops = auth("ops", "OPS")
    forms_ = encoded_forms(FUZZED)
    printable = [f for f in forms_ if f.isprintable()]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def call(method: str, url: str, **kw) -> None:
            async with http.request(method, url, **kw) as r:
                await r.read()
                assert r.status < 500, (method, url, r.status)

        await call("PUT", base + "/v1/records/CASE-9", json=record("CASE-9", FUZZED), headers=la)
        for f in forms_:
            q = f.replace("\x01", "%01").replace("\x1f", "%1F").replace("\t", "%09").replace("\x7f", "%7F")
            for path in (
                f"/v1/records/{q}",
                f"/v1/children/{q}/accesses",
                f"/v1/records?nhsNumber={q}",
                f"/fhir/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|{q}",
                f"/fhir/Flag?patient:identifier={q}",
                f"/v1/admin/audit?nhsNumber={q}",
                f"/v1/notifications?after={q}",
                f"/{q}",
                f"/fhir/Encounter/{q}",
            ):
                who = ed if path.startswith("/fhir") else ops if "/admin/" in path else la
                await call("GET", yarl_url(base + path), headers=who)
        for f in printable:
            await call(
                "GET",
                base + "/v1/records/CASE-9",
                headers={**la, "TraceID": f, "X-Request-ID": f, "X-Anything": f, "User-Agent": f},
            )
            await call(
                "GET",
                base + "/fhir/CareTeam",
                params={"patient:identifier": f"x|{f}"},
                headers={**ed, "TraceID": f, "IsUnscheduledAccessEvent": f},
            )
            await call("GET", base + "/v1/records/CASE-9", headers={"Authorization": f"Bearer {f}"})
        bodies = (
            [json.dumps(record("CASE-8", f)) for f in forms_]
            + ['{"localId":"CASE-7","nhsNumber":"' + e + '"}' for e in json_escaped(FUZZED)]
            + ['{"nhsNumber": "' + FUZZED + '", ', "nhsNumber=" + FUZZED, FUZZED]
        )
        for body in bodies:
            await call(
                "PUT", base + "/v1/records/CASE-8", data=body, headers={**la, "Content-Type": "application/json"}
            )
            await call("POST", base + "/v1/uploads", data=body, headers={**la, "Content-Type": "application/json"})
            await call(
                "POST", base + "/fhir/Encounter", data=body, headers={**ed, "Content-Type": "application/fhir+json"}
            )
            await call(
                "POST",
                base + "/cds-services/cpis-patient-view",
                data=body,
                headers={**ed, "Content-Type": "application/json"},
            )
            await call(
                "POST",
                base + "/v1/uploads",
                data=body,
                headers={**la, "Content-Type": "text/csv", "Upload-Sequence": body[:40], "Upload-Mode": "delta"},
            )
    for data in raw_requests(forms_):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            assert FUZZED.encode() not in answer
        finally:
            writer.close()


def yarl_url(url: str):
    from yarl import URL

    return URL(url, encoded=True)  # sent as written: the percent-encodings are the point


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_every_encoding_of_a_number_is_kept_out_of_the_logs(service_env, fmt, tmp_path):
    service_env["CPIS_LOG_FORMAT"] = fmt
    port = int(service_env["CPIS_PORT"])
    base = f"http://127.0.0.1:{port}"
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"  # files: a full pipe would stall the service
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cpis_bridge", "serve"], env=service_env, stdout=out, stderr=err)
        try:
            await wait_ready_async(base, proc, timeout=60)
            await fuzz(base, port)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = out_path.read_text(errors="replace") + err_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) > 100, text[-2000:]
    assert any("debug" in line.lower() for line in lines), "DEBUG logging was on"
    assert "AssertionError" not in text and "Error in logging" not in text
    for line in lines:
        for view in decoded_views(line):
            assert FUZZED not in view, f"an NHS number in a log line: {line[:400]}"
