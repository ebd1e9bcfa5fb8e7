"""``cpis-bridge serve``: run the service until SIGTERM or SIGINT, draining first (readiness off, then in-flight
requests finish within the grace period); the heap settled once started."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web

from cpis_bridge.app import create_app
from cpis_bridge.config import Settings
from cpis_bridge.web.server import AccessLogger, Runner
from cpis_bridge.web.state import LIFECYCLE

log = logging.getLogger("cpis_bridge.cli")

GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once started: move every object alive now (modules, models, registry, app) out of the garbage collector's
    reach, so a full collection walks only what requests create; then collect the youngest generation after 10,000
    net new containers instead of 700 (requests in flight hold more than 700 between them, all freed by reference
    count). Cyclic garbage waits a little longer. Measurements: bench/README.md."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(settings: Settings) -> int:
    app = create_app(settings)
    log.debug(
        "serve.config",
        extra={
            "redis": "external" if settings.redis_url else "embedded",
            "devMode": settings.dev_mode,
            "flagSync": bool(settings.fhir_base_url),
            "drainDelayS": settings.drain_delay_s,
            "shutdownGraceS": settings.shutdown_grace_s,
            "logLevel": settings.log_level,
        },
    )
    runner = Runner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("cpis_bridge.access"),
        shutdown_timeout=settings.shutdown_grace_s,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True, reuse_port=settings.reuse_port or None)
    await site.start()
    settle_heap()
    log.info("serve.listening", extra={"host": settings.host, "port": settings.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Readiness first: /readyz answers 503 while in-flight requests finish and load balancers move away.
    app[LIFECYCLE].draining = True
    log.info("serve.draining", extra={"delayS": settings.drain_delay_s})
    if settings.drain_delay_s:
        await asyncio.sleep(settings.drain_delay_s)
    await runner.cleanup()
    log.info("serve.stopped")
    return 0
