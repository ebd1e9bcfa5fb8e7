"""Flag sync against a real third-party FHIR R4 server (sekmet-fhir from PyPI, FastAPI/SQLite, strict inbound
validation) started as a subprocess on a free loopback port: the server's final state equals the store."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cpis_bridge.services.reconcile import compare
from tests.support.sync import make_env
from tests.support.world import record

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sekmet(tmp_path_factory: pytest.TempPathFactory):
    exe = shutil.which("sekmet", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("sekmet-fhir is not installed (it is in the dev extra)")
    work = tmp_path_factory.mktemp("sekmet")
    port = _free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    (work / "settings.yaml").write_text(
        f"base_url: {base}\nhost: 127.0.0.1\nport: {port}\ndata_dir: {work / 'data'}\n"
        "simulator: {enabled: false}\nlog_inbound: false\nvalidation: {inbound: strict}\n"
    )
    log = (work / "sekmet.log").open("wb")
    proc = subprocess.Popen(
        [exe, "serve", "-c", str(work / "settings.yaml"), "--host", "127.0.0.1", "--port", str(port)],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SEKMET_CONFIG": str(work / "settings.yaml")},
    )
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                with urllib.request.urlopen(f"{base}/metadata", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sekmet did not start: " + (work / "sekmet.log").read_text()[-2000:])
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


async def _server_state(env) -> dict[str, tuple]:
    found = await env.parts.server.our_flags()
    out = {}
    for key, flags in found.items():
        assert len(flags) == 1, f"one Flag per record, got {len(flags)}"
        f = flags[0]
        p = f.get("period", {})
        out[key] = (f["status"], p.get("start"), p.get("end"), f["subject"]["identifier"]["value"])
    return out


@pytest.mark.parametrize("mode", ["auto", "conditional"])
async def test_sekmet_ends_equal_to_the_store(aiohttp_client, make_settings, sekmet, mode, caplog):
    caplog.set_level(logging.INFO, logger="cpis_bridge.fhir.sync")
    settings = make_settings(fhir_base_url=sekmet, relays=False, fhir_write_mode=mode)
    env = await make_env(aiohttp_client, settings, timeout_s=10.0)
    p = f"{mode[:4]}-"
    try:
        env.clock.set_day(dt.date(2026, 2, 15))
        numbers = ["9990000018", "9990000026", "9990000034"]
        for i in range(12):  # a backlog: goes as batch Bundles
            await env.put(
                f"{p}{i}",
                record(
                    f"{p}{i}",
                    nhs=numbers[i % 3],
                    planType=("CPP", "LAC", "UCPP")[i % 3],
                    endDate="2026-02-01" if i % 4 == 0 else None,
                ),
            )
        await env.put(f"{p}gone", record(f"{p}gone"))
        await env.drain()
        assert env.parts.server.mode == ("id" if mode == "auto" else "conditional")
        # the backlog went as batch Bundles answered entry by entry: no fallback, nothing verified or resent
        assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("fhir.batch")]
        assert env.parts.server.client.sent <= 4, "metadata, then one Bundle for the 13 records"
        await env.put(f"{p}1", record(f"{p}1", nhs=numbers[1], planType="LAC", endDate="2026-02-10"))  # a single
        await env.erase(f"{p}gone")
        await env.drain()
        state = {k: v for k, v in (await _server_state(env)).items() if k.startswith(f"LA001|{p}")}
        assert state.pop(f"LA001|{p}gone")[0] == "entered-in-error"
        assert state == await env.expected()
        assert await env.dead() == []
        # the UCPP records ended 2026-02-01 leave their 28-day window: inactive without any upload
        env.clock.set_day(dt.date(2026, 3, 2))
        assert await env.parts.scheduler.run_once() == 1  # i = 8: the one ended UCPP
        await env.drain()
        state = {k: v for k, v in (await _server_state(env)).items() if k.startswith(f"LA001|{p}")}
        state.pop(f"LA001|{p}gone")
        assert state[f"LA001|{p}8"][0] == "inactive"
        assert state == await env.expected()
        drift, _, _ = await compare(
            env.parts.server, env.parts.queue.all_records(), day=dt.date(2026, 3, 2), windows=settings.windows
        )
        assert drift.missing == [] and drift.wrong == []
    finally:
        await env.session.close()
