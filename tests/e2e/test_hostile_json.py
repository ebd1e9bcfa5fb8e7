"""Hostile JSON bodies: deep or never-closing nesting of every shape is refused before a parser sees it, in memory
bounded by a small multiple of the body and in time linear in it (measured in a subprocess, on the real parser
paths: the upload reader and the request-body loader), and every route answers it 400/422, never 5xx."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.support.world import ED, LA1

# Each shape is (prefix, unit, suffix): the unit repeated to the body's size. Strings holding brackets and escaped
# quotes make the bracket skeleton harder to find; the last shapes are balanced but deep, or valid and wide.
SHAPES: dict[str, tuple[bytes, bytes, bytes]] = {
    "open-arrays": (b"", b"[", b""),
    "open-objects": (b"", b'{"a":', b""),
    "open-mixed": (b'{"records":', b'[{"a":', b""),
    "open-with-bracket-strings": (b"", b'["]\\"[{",', b""),
    "open-after-records": (b'{"sequence":1,"mode":"delta","records":[', b'{"x":[', b""),
    "unterminated-string": (b'{"records":["', b"[{", b""),
    "closing-only": (b"", b"]}", b""),
}

PROBE = r"""
import json, os, resource, sys, tempfile, time
from cpis_bridge.core.errors import UnreadableInput
from cpis_bridge.services.uploads import UploadMeta
from cpis_bridge.web.common import MAX_FHIR_NESTING, loads_json
from cpis_bridge.web.uploads import reader_for


def measure(prefix, unit, suffix, size, content_type):
    # old code grew to tens of GB on these bodies: fail fast instead of taking the machine down
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    body = prefix.encode() + unit.encode() * (size // len(unit)) + suffix.encode()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    outcome = {}
    for name, parse in (
        ("upload", lambda f: list(reader_for(content_type, f, UploadMeta()))),
        ("body", lambda f: loads_json(body, limit=MAX_FHIR_NESTING)),
    ):
        with tempfile.TemporaryFile() as f:
            f.write(body)
            f.flush()
            try:
                parse(f)
                outcome[name] = "parsed"
            except UnreadableInput:
                outcome[name] = "refused"
            except MemoryError:
                outcome[name] = "out of memory"
    seconds = time.perf_counter() - t0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"outcome": outcome, "grown_kb": grown, "seconds": seconds, "bytes": len(body)}


for case in json.loads(sys.argv[1]):  # each case in a forked child, so each high-water mark is its own
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(measure(*case)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    print(text or json.dumps({"outcome": "child died"}))
"""


def probe(*cases: tuple[str, int, str]) -> list[dict[str, Any]]:
    """Measure each (shape, size, content type) in one subprocess (imports once, forks per case)."""
    args = [[*(part.decode() for part in SHAPES[shape]), size, ct] for shape, size, ct in cases]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


JSON = "application/json"
NDJSON = "application/x-ndjson"
LINEAR = ("open-with-bracket-strings", "open-mixed")
CASES = [
    *[(shape, size, JSON) for shape in sorted(SHAPES) for size in (100_000, 1_000_000)],
    ("open-arrays", 200_000, NDJSON),
    *[(shape, size, JSON) for shape in LINEAR for size in (500_000, 4_000_000)],
]


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, int, str], dict[str, Any]]:
    return dict(zip(CASES, probe(*CASES), strict=True))


def test_hostile_nesting_is_refused_in_bounded_memory(measured: dict[tuple[str, int, str], Any]) -> None:
    for case, out in measured.items():
        if case[2] == NDJSON:
            assert out["outcome"]["upload"] == "refused", (case, out)  # one line of it, as deep
        else:
            assert out["outcome"] == {"upload": "refused", "body": "refused"}, (case, out)
        # a few copies of the body (the skeleton passes) and nothing that grows with the depth
        assert out["grown_kb"] * 1024 < 8 * out["bytes"] + (16 << 20), (case, out)


def test_refusal_time_is_linear_in_the_body(measured: dict[tuple[str, int, str], Any]) -> None:
    for shape in LINEAR:
        small, large = measured[(shape, 500_000, JSON)], measured[(shape, 4_000_000, JSON)]
        # quadratic work takes 64 times as long; linear about 8 (allowance for a shared, noisy machine)
        assert large["seconds"] < 20 * small["seconds"] + 0.5, (small, large)


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": [value]}
    return value


async def test_every_json_route_refuses_deep_and_unbalanced_bodies(client: Any) -> None:
    deep = json.dumps(_nested(40)).encode()
    unbalanced = b'{"a":' * 50_000
    routes = [
        ("PUT", "/v1/records/CASE-1", LA1, "application/json"),
        ("POST", "/fhir/Encounter", ED, "application/fhir+json"),
        ("POST", "/cds-services/cpis-patient-view", ED, "application/json"),
    ]
    for method, path, headers, ct in routes:
        for body in (deep, unbalanced):
            r = await client.request(method, path, data=body, headers={**headers, "Content-Type": ct})
            assert r.status == 400, (path, r.status, await r.text())
    for body in (deep, unbalanced):
        r = await client.post("/v1/uploads", data=body, headers={**LA1, "Content-Type": "application/json"})
        assert r.status == 422, await r.text()
        assert (await r.json())["code"] == "CPF01"


async def test_valid_bodies_with_brackets_in_strings_are_still_accepted(client: Any) -> None:
    from tests.support.world import record

    body = record("CASE-[{x}]", givenName='Br[ack{et"s', familyName="\\]]]}}}")
    r = await client.put("/v1/records/CASE-%5B%7Bx%7D%5D", json=body, headers=LA1)
    assert r.status == 201, await r.text()
    records = [record(f"C-{i}", givenName="[" * 40) for i in range(40)]
    upload = {"sequence": 1, "mode": "delta", "recordCount": 40, "records": records}
    r = await client.post("/v1/uploads", json=upload, headers=LA1)
    assert r.status == 200 and (await r.json())["accepted"] == 40, await r.text()
