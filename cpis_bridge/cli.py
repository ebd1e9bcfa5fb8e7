"""The ``cpis-bridge`` command: serve, token, upload, reconcile, purge, export, demo."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cpis_bridge import log as logmod
from cpis_bridge.config import Settings
from cpis_bridge.core.principal import Role

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
    from cpis_bridge.app import create_app
    from cpis_bridge.web.server import AccessLogger, Runner
    from cpis_bridge.web.state import LIFECYCLE

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
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
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


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from cpis_bridge.auth import dev_token

    if not settings.dev_mode:
        print("cpis-bridge token: refused: production auth (CPIS_AUTH_JWKS_URL) is configured", file=sys.stderr)
        return 2
    print(
        dev_token(
            settings.dev_secret(),
            role=Role(args.role),
            ods=args.ods,
            name=args.name,
            role_code=args.role_code,
            ttl_s=args.ttl,
            extra={"sds_user_id": args.sds_user_id} if args.sds_user_id else None,
        )
    )
    return 0


_UPLOAD_TYPES = {
    ".json": "application/json",
    ".ndjson": "application/x-ndjson",
    ".jsonl": "application/x-ndjson",
    ".csv": "text/csv",
}


async def cmd_upload(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cpis_bridge.auth import dev_token

    path = Path(args.file)
    ct = _UPLOAD_TYPES.get(path.suffix.lower())
    if ct is None:
        print("cpis-bridge upload: the file must end .json, .ndjson, .jsonl or .csv", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("CPIS_TOKEN")
    if not token:
        if not settings.dev_mode or not args.ods:
            print("cpis-bridge upload: give --token (or CPIS_TOKEN), or --ods in dev mode", file=sys.stderr)
            return 2
        token = dev_token(settings.dev_secret(), role=Role.LOCAL_AUTHORITY, ods=args.ods, ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": ct}
    if ct != "application/json":
        headers["Upload-Mode"] = args.mode
        headers["Upload-Sequence"] = str(args.sequence or int(time.time()))
        if args.record_count is not None:
            headers["Upload-Record-Count"] = str(args.record_count)
    size = path.stat().st_size
    url = (args.url or settings.base_url).rstrip("/") + "/v1/uploads"
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="upload", disable=args.quiet or None)

    async def body() -> AsyncIterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                bar.update(len(chunk))
                yield chunk

    headers["Content-Length"] = str(size)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, data=body(), headers=headers) as resp:
            text = await resp.text()
    bar.close()
    print(text)
    return 0 if resp.status == 200 else 1


async def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """Compare the store with the Flag sync server, repair drift, verify; prints one JSON line. Exit 0 = in sync."""
    import json

    from tqdm import tqdm

    from cpis_bridge.app import flag_sync_parts, redis_url_for
    from cpis_bridge.core.clock import today_london
    from cpis_bridge.services.reconcile import compare, repair
    from cpis_bridge.store.connection import make_client
    from cpis_bridge.store.keys import Keys
    from cpis_bridge.store.scripts import Scripts

    if not settings.fhir_base_url:
        print("cpis-bridge reconcile: CPIS_FHIR_BASE_URL is not set (Flag sync is off)", file=sys.stderr)
        return 2
    url, embedded = await asyncio.to_thread(redis_url_for, settings)
    redis = make_client(url, **settings.redis_secrets())
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, connect=5))
    try:
        keys = Keys(settings.key_prefix, settings.hash_key())
        parts = flag_sync_parts(settings, redis, keys, Scripts(redis), session)
        await parts.server.prepare()
        day = today_london()
        bar = tqdm(desc="reconcile: server Flags read", unit="flag", disable=args.quiet, file=sys.stderr)
        drift, wanted, found = await compare(
            parts.server, parts.queue.all_records(), day=day, windows=settings.windows, tick=bar.update
        )
        bar.close()
        report: dict[str, Any] = {
            "records": len(wanted),
            "serverFlags": sum(len(v) for v in found.values()),
            "drift": drift.counts(),
        }
        if not args.dry_run and drift.total:
            bar = tqdm(total=drift.total, desc="reconcile: repairing", unit="flag", disable=args.quiet, file=sys.stderr)
            await repair(parts.server, drift, wanted, found, tick=bar.update)
            bar.close()
            after, _, _ = await compare(parts.server, parts.queue.all_records(), day=day, windows=settings.windows)
            report["repaired"] = drift.total - len(drift.failed)
            report["after"] = after.counts()
            in_sync = after.total == 0
        else:
            in_sync = drift.total == 0
        report["inSync"] = in_sync
        print(json.dumps(report))
        return 0 if in_sync else 1
    finally:
        await session.close()
        await redis.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def cli_context(actor: str | None) -> Any:
    """The audit context of a command-line operator (ops role; the OS user unless --actor names someone)."""
    import getpass

    from cpis_bridge.core.audit import AuditContext
    from cpis_bridge.core.principal import Principal

    if not actor:
        try:
            actor = getpass.getuser()
        except (KeyError, OSError):
            actor = str(os.getuid())
    return AuditContext(Principal(subject=f"cli:{actor}", role=Role.OPS, ods="CLI"))


async def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from cpis_bridge.app import open_retention

    async with open_retention(settings) as service:
        counts = await service.purge(cli_context(args.actor))
    log.info("retention.purged", extra={"removed": counts})
    print(orjson.dumps({"removed": counts}).decode())
    return 0


async def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from cpis_bridge.app import open_retention
    from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber

    try:
        nhs = NhsNumber.parse(args.nhs_number)
    except InvalidNhsNumber as exc:
        print(f"cpis-bridge export: {exc}", file=sys.stderr)
        return 2
    async with open_retention(settings) as service:
        data = await service.export(cli_context(args.actor), nhs)
    text = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data: owner only
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(text + "\n")
    else:
        print(text)
    log.info("retention.exported")
    return 0


async def _demo_json(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kw) as resp:
        text = await resp.text()
        try:
            import orjson

            return resp.status, orjson.loads(text) if text else None
        except ValueError:
            return resp.status, text


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Against a running service: upload a demo record, look the child up as an unscheduled care setting, then show
    the notification in the LA's pull inbox and, when the LA has a webhook, that it was delivered."""
    import datetime as dt
    import uuid

    import orjson

    from cpis_bridge.auth import dev_token
    from cpis_bridge.fhir.formats import JSON_CT
    from cpis_bridge.registry import load_registry

    if not settings.dev_mode:
        print("cpis-bridge demo: refused: it needs dev tokens, and production auth is configured", file=sys.stderr)
        return 2
    registry = load_registry(settings.registry)
    la = registry.local_authorities.get(args.la) if args.la else next(iter(registry.local_authorities.values()), None)
    cs = (
        registry.care_settings.get(args.care_setting)
        if args.care_setting
        else next((c for c in registry.care_settings.values() if c.unscheduled), None)
    )
    if la is None or cs is None or not cs.unscheduled:
        print("cpis-bridge demo: the registry needs a local authority and an unscheduled care setting", file=sys.stderr)
        return 2
    secret = settings.dev_secret()
    h_la = {"Authorization": "Bearer " + dev_token(secret, role=Role.LOCAL_AUTHORITY, ods=la.ods, ttl_s=600)}
    h_cs = {
        "Authorization": "Bearer "
        + dev_token(secret, role=Role.CARE_SETTING, ods=cs.ods, name="Demo Clinician", role_code="R8000", ttl_s=600)
    }
    h_ops = {"Authorization": "Bearer " + dev_token(secret, role=Role.OPS, ods="OPS", ttl_s=600)}
    base = (args.url or settings.base_url).rstrip("/")
    nhs, local_id, trace = args.nhs_number, f"DEMO-{args.nhs_number}", str(uuid.uuid4())
    today = dt.datetime.now(dt.UTC).date().isoformat()
    body = {
        "localId": local_id,
        "planType": "CPP",
        "nhsNumber": nhs,
        "dateOfBirth": "2016-04-02",
        "startDate": today,
        "endDate": None,
    }
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status, _ = await _demo_json(session, "PUT", f"{base}/v1/records/{local_id}", json=body, headers=h_la)
        print(f"1. {la.ods} uploaded record {local_id}: HTTP {status}")
        if status not in (200, 201):
            return 1
        dead_before = await _webhook_dead(session, base, h_ops) if la.webhook else 0
        status, bundle = await _demo_json(
            session,
            "GET",
            f"{base}/fhir/CareTeam",
            params={"patient:identifier": f"https://fhir.nhs.uk/Id/nhs-number|{nhs}"},
            headers={**h_cs, "IsUnscheduledAccessEvent": "true", "TraceID": trace, "Accept": JSON_CT},
        )
        total = bundle.get("total") if isinstance(bundle, dict) else None
        print(f"2. {cs.ods} ({cs.name}) looked the child up, unscheduled: HTTP {status}, {total} CareTeam(s)")
        if status != 200:
            return 1
        found = await _find_notification(session, base, h_la, trace, args.wait)
        if found is None:
            print(f"3. no notification for this access in {la.ods}'s inbox after {args.wait:.0f} s")
            return 1
        print(f"3. {la.ods}'s pull inbox holds notification {found['id']}:")
        print(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        if la.webhook is None:
            print(f"4. {la.ods} has no webhook: the pull inbox is its channel")
            return 0
        state = await _webhook_settled(session, base, h_ops, dead_before, args.wait)
        print(f"4. webhook {la.webhook.url}: {state}")
        return 0 if state == "delivered" else 1


async def _find_notification(
    session: aiohttp.ClientSession, base: str, headers: dict[str, str], trace: str, wait_s: float
) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait_s
    cursor: str | None = None
    while True:
        params = {"limit": "1000", **({"after": cursor} if cursor else {})}
        status, page = await _demo_json(session, "GET", f"{base}/v1/notifications", params=params, headers=headers)
        if status != 200:
            return None
        for item in page["notifications"]:
            if item["access"]["sourceEventId"] == trace:
                return dict(item)
        cursor = page["next"]
        if not page["notifications"]:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.2)


async def _webhook_dead(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> int:
    status, body = await _demo_json(session, "GET", f"{base}/v1/admin/deliveries", headers=headers)
    return int(body["channels"]["webhook"]["dead"]) if status == 200 else 0


async def _webhook_settled(
    session: aiohttp.ClientSession, base: str, headers: dict[str, str], dead_before: int, wait_s: float
) -> str:
    """'delivered' once the webhook channel has nothing pending or retrying and no new dead letter."""
    deadline = time.monotonic() + wait_s
    while True:
        status, body = await _demo_json(session, "GET", f"{base}/v1/admin/deliveries", headers=headers)
        if status != 200:
            return f"cannot read the delivery state (HTTP {status})"
        w = body["channels"]["webhook"]
        if w["dead"] > dead_before:
            return "dead-lettered (see GET /v1/admin/deliveries)"
        if w["pending"] == 0 and w["retrying"] == 0:
            return "delivered"
        if time.monotonic() > deadline:
            return f"not yet delivered: {w['pending']} pending, {w['retrying']} retrying"
        await asyncio.sleep(0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpis-bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service")
    tok = sub.add_parser("token", help="print a dev token signed with the dev secret")
    tok.add_argument("--role", required=True, choices=[r.value for r in Role])
    tok.add_argument("--ods", required=True)
    tok.add_argument("--name")
    tok.add_argument("--role-code")
    tok.add_argument("--sds-user-id", help="the national SDS user id (digits) a smartcard session would carry")
    tok.add_argument("--ttl", type=int, default=3600)
    up = sub.add_parser("upload", help="upload a batch file (JSON, NDJSON or CSV) to a running service")
    up.add_argument("file")
    up.add_argument("--mode", choices=["delta", "full"], default="delta")
    up.add_argument("--sequence", type=int)
    up.add_argument("--record-count", type=int)
    up.add_argument("--ods", help="dev mode: upload as this local authority")
    up.add_argument("--token")
    up.add_argument("--url")
    up.add_argument("--quiet", action="store_true")
    rec = sub.add_parser("reconcile", help="compare the store with the Flag sync server and repair drift")
    rec.add_argument("--dry-run", action="store_true", help="report drift only; exit 1 when there is any")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    pg = sub.add_parser("purge", help="delete what is past the retention settings (CPIS_RETENTION_*); prints counts")
    pg.add_argument("--actor", help="who runs it (recorded in the audit; default: the OS user)")
    ex = sub.add_parser("export", help="print everything held for an NHS number as JSON (subject access)")
    ex.add_argument("--nhs-number", required=True)
    ex.add_argument("--output", help="write to this file (mode 0600) instead of stdout")
    ex.add_argument("--actor", help="who runs it (recorded in the audit; default: the OS user)")
    demo = sub.add_parser("demo", help="against a running service: record, unscheduled look-up, notification")
    demo.add_argument("--la", help="the demo local authority's ODS code (default: the registry's first)")
    demo.add_argument("--care-setting", help="an unscheduled care setting's ODS code (default: the first)")
    demo.add_argument("--nhs-number", default="9990000018", help="a test-range NHS number")
    demo.add_argument("--url", help="the service's base URL (default: CPIS_PUBLIC_BASE_URL or host:port)")
    demo.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the notification")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"cpis-bridge: configuration error: {problems}", file=sys.stderr)
        return 2
    logmod.configure(settings.log_level, settings.log_format, settings.hash_key())
    if args.command == "serve":
        return run(serve(settings))
    if args.command == "token":
        return cmd_token(settings, args)
    if args.command == "upload":
        return run(cmd_upload(settings, args))
    if args.command == "reconcile":
        return run(cmd_reconcile(settings, args))
    if args.command == "purge":
        return run(cmd_purge(settings, args))
    if args.command == "export":
        return run(cmd_export(settings, args))
    if args.command == "demo":
        return run(cmd_demo(settings, args))
    return 2


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where available (faster event loop), else asyncio's own."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)
