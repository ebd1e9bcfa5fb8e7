"""The throughput baseline (docs/quality.md): a minimal aiohttp app whose handler does one pipelined Redis round trip
(HGETALL + LRANGE 0 24) and answers ~2 KB of JSON, on the service's loop (uvloop), JSON library (orjson), hiredis
and connection pool (cpis_bridge.store.connection.make_client).

Run: ``python -m bench.baseline --port 8181 --redis-url unix:///... --children 1000`` (seeds its own keys first).
``--wait N``: each answer also waits, in the same pipeline, for N replicas (a fence SET and ``WAIT N``, as the
service does with CPIS_REDIS_MIN_REPLICAS=N): the baseline of the replicated case.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import orjson
import redis as redis_sync
from aiohttp import web

from cpis_bridge.store.connection import make_client

PREFIX = "bench:base"
REDIS = web.AppKey("redis", object)
WAIT = web.AppKey("wait", int)


def record_key(i: int) -> str:
    return f"{PREFIX}:{{{i}}}:r"


def access_key(i: int) -> str:
    return f"{PREFIX}:{{{i}}}:a"


def seed(url: str, children: int) -> None:
    """Per child: a hash of two compact records (~230 B each) and a 25-entry list (~45 B each)."""
    client = redis_sync.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(children):
            rec = orjson.dumps(
                {
                    "p": "CPP",
                    "n": f"999{i:07d}",
                    "b": "2016-04-02",
                    "s": "2026-01-10",
                    "g": "Testchild",
                    "f": "Example",
                    "v": 1,
                    "u": "2026-01-10T09:00:00.000Z",
                    "padding": "x" * 90,
                }
            )
            pipe.delete(record_key(i), access_key(i))
            pipe.hset(record_key(i), mapping={f"LA001|CASE-{i}": rec, f"LA002|CASE-{i}": rec})
            pipe.rpush(access_key(i), *[f"RXX01\x1fev-{i}-{j:04d}\x1f2026-11-22T01:02:03.000Z" for j in range(25)])
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()


async def child(request: web.Request) -> web.Response:
    i = int(request.match_info["i"])
    client = request.app[REDIS]
    async with client.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
        pipe.hgetall(record_key(i))
        pipe.lrange(access_key(i), 0, 24)
        if request.app[WAIT]:
            pipe.set(f"{PREFIX}:fence", "1")
            pipe.execute_command("WAIT", request.app[WAIT], 1000)
        records, accesses, *confirmed = await pipe.execute()
    if confirmed and int(confirmed[-1]) < request.app[WAIT]:
        return web.Response(status=503)
    body = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(records),
        "records": records,
        "accesses": accesses,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def make_app(url: str, wait: int = 0) -> web.Application:
    app = web.Application()
    app[WAIT] = wait

    async def redis_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        client = make_client(url)
        app[REDIS] = client
        yield
        await client.aclose()

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/child/{i}", child)
    return app


async def serve(host: str, port: int, url: str, wait: int = 0) -> int:
    runner = web.AppRunner(make_app(url, wait), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("baseline.listening", flush=True)
    await stop.wait()
    await runner.cleanup()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8181)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--children", type=int, default=1000)
    parser.add_argument("--wait", type=int, default=0, help="replicas each answer waits for (WAIT)")
    args = parser.parse_args()
    seed(args.redis_url, args.children)
    import uvloop

    return uvloop.run(serve(args.host, args.port, args.redis_url, args.wait))


if __name__ == "__main__":
    raise SystemExit(main())
