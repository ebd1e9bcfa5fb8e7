"""The benchmark harness in its tiny mode (`python -m bench.run --quick`), so `make bench` cannot rot unnoticed.

No timing is asserted: only that every case ran (or was skipped with a reason) and the results file has its shape.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)")


def test_bench_quick_mode_runs_every_case(tmp_path):
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPIS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--skip", "notify,sync", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = orjson.loads(out.read_bytes())
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["wrk"]
    names = [c["name"] for c in doc["cases"]]
    assert names[0].startswith("baseline") and len(names) == 7
    assert any(n.endswith("serve --workers 2") for n in names)
    assert any(n.endswith("1 replica confirming") for n in names)  # the replicated case, with its own waiting baseline
    baseline = doc["cases"][0]
    assert baseline["rps"] > 0 and baseline["p99_ms"] >= baseline["p50_ms"] > 0 and baseline["errors"] == 0
    for case in doc["cases"][1:]:
        assert {"name", "rps", "p50_ms", "p99_ms", "baseline_rps", "ratio", "target_ratio"} <= set(case)
        if case.get("skipped"):
            assert "answered" in case["skipped"] and case["rps"] is None
        else:  # the FHIR API is merged: the case must really have run without errors
            assert case["rps"] > 0 and case["errors"] == 0 and case["ratio"] > 0
    upload = doc["upload"]
    assert upload["records"] == 2000 and upload["records_per_s"] > 0 and 0 < upload["peak_rss_mb"] < 2000
    memory = doc["memory"]
    assert memory["children"] == 40 and memory["bytes_per_child"] > 0
    if memory["accesses_measured"]:
        assert memory["key_usage_per_child"]["access_list"] > 0 and memory["audit_bytes_per_child"] > 0
    # The table is printed with every case.
    for name in names:
        assert name in proc.stdout
