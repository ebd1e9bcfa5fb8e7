"""Initial Flag sync throughput: 10,000 records queued in a real Redis, one relay drains them to a local FHIR server
double running in its own process. Prints one JSON line (batch Bundles, then single PUTs for comparison).

    .venv/bin/python -m bench.sync_throughput [--records 10000] [--singles 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent


def _serve_double(port: int, batch: bool) -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.fhir_double import FhirDouble

    async def main() -> None:
        double = FhirDouble(batch=batch)

        async def cpu(request: web.Request) -> web.Response:
            return web.json_response({"cpu": time.process_time()})

        double.app.router.add_get("/cpu", cpu)
        runner = web.AppRunner(double.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(f"{url}/metadata") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("double did not start")


async def run_case(records: int, batch: bool, redis_url: str, data_dir: Path) -> dict[str, Any]:
    from cpis_bridge.app import SCRIPTS, create_app, flag_sync_parts
    from cpis_bridge.config import Settings
    from cpis_bridge.core.audit import AuditContext
    from cpis_bridge.core.nhs import iter_test_numbers
    from cpis_bridge.core.principal import Principal, Role
    from cpis_bridge.services.sync import epoch_ms, utc_now
    from cpis_bridge.web.state import KEYS, RECORDS, REDIS

    port = _free_port()
    proc = multiprocessing.Process(target=_serve_double, args=(port, batch), daemon=True)
    proc.start()
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        await _wait_up(base)
        settings = Settings(_env_file=None, redis_url=redis_url, key_prefix=f"bench{os.getpid()}{int(batch)}",  # type: ignore[call-arg]
                            data_dir=data_dir, fhir_base_url=base, relays=False, log_hash_key="bench-key",
                            auth_dev_secret="bench-secret-0123456789012345678901234")
        app = create_app(settings)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            ctx = AuditContext(Principal(subject="bench", role=Role.LOCAL_AUTHORITY, ods="LA001", name="Bench",
                                         role_code="R0001"))
            numbers = iter_test_numbers()
            bodies = [{"localId": f"B-{i}", "planType": "CPP", "nhsNumber": str(next(numbers)),
                       "dateOfBirth": "2016-04-02", "startDate": "2026-01-10"} for i in range(records)]
            for i in range(0, records, 200):
                await asyncio.gather(*(app[RECORDS].put(ctx, "LA001", b["localId"], b) for b in bodies[i : i + 200]))
            async with aiohttp.ClientSession() as session:
                parts = flag_sync_parts(settings, app[REDIS], app[KEYS], app[SCRIPTS], session)
                await parts.queue.ensure_group()
                await parts.server.prepare()
                parts.relay.block_ms = 10
                async with session.get(f"http://127.0.0.1:{port}/cpu") as r:
                    server_cpu0 = (await r.json())["cpu"]
                cpu0, t0 = time.process_time(), time.perf_counter()
                for _ in range(100_000):
                    await parts.relay.run_once()
                    pending, _ = await parts.queue.stats(epoch_ms(utc_now()))
                    if pending == 0:
                        break
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                async with session.get(f"http://127.0.0.1:{port}/cpu") as r:
                    server_cpu = (await r.json())["cpu"] - server_cpu0
                dead = len(await parts.queue.dead_letters())
            keys = [k async for k in app[REDIS].scan_iter(match=f"{settings.key_prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await app[REDIS].delete(*keys[i : i + 500])
        finally:
            await runner.cleanup()
        return {"mode": "batch" if batch else "single", "records": records, "seconds": round(seconds, 3),
                "records_per_s": round(records / seconds), "relay_cpu_share": round(cpu / seconds, 2),
                "server_cpu_share": round(server_cpu / seconds, 2), "dead": dead}
    finally:
        proc.kill()
        proc.join(5)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--singles", type=int, default=2_000)
    args = parser.parse_args()
    from cpis_bridge.store.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp:
        redis_url = os.environ.get("CPIS_REDIS_URL")
        embedded = None
        if not redis_url:
            embedded = EmbeddedRedis(Path(tmp) / "redis")
            embedded.start()
            redis_url = embedded.url
        try:
            cases = [await run_case(args.records, True, redis_url, Path(tmp) / "var")]
            if args.singles:
                cases.append(await run_case(args.singles, False, redis_url, Path(tmp) / "var"))
        finally:
            if embedded is not None:
                embedded.stop()
    print(json.dumps({"bench": "flag-sync-initial", "cpus": os.cpu_count(), "cases": cases}))


if __name__ == "__main__":
    asyncio.run(main())
