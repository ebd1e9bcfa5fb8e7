"""The operator's commands: token (a dev token), upload (a batch file to a running service), reconcile (the store
against the Flag sync server), purge (retention) and export (subject access). The store-side ones run on
compose.open_services, as the service does (imported when used: token and upload need none of it)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tqdm import tqdm

from cpis_bridge.auth import dev_token
from cpis_bridge.bootstrap import dev_secret
from cpis_bridge.config import Settings
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import today_london
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.principal import Principal, Role

log = logging.getLogger("cpis_bridge.cli")


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.dev_mode:
        print("cpis-bridge token: refused: production auth (CPIS_AUTH_JWKS_URL) is configured", file=sys.stderr)
        return 2
    print(
        dev_token(
            dev_secret(settings),
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
        token = dev_token(dev_secret(settings), role=Role.LOCAL_AUTHORITY, ods=args.ods, ttl_s=3600)
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
    from cpis_bridge.compose import open_services
    from cpis_bridge.services.reconcile import compare, repair

    if not settings.fhir_base_url:
        print("cpis-bridge reconcile: CPIS_FHIR_BASE_URL is not set (Flag sync is off)", file=sys.stderr)
        return 2
    async with open_services(settings, fhir_timeout_s=60.0) as opened:
        parts = opened.sync
        assert parts is not None
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


def cli_context(actor: str | None) -> AuditContext:
    """The audit context of a command-line operator (ops role; the OS user unless --actor names someone)."""
    if not actor:
        try:
            actor = getpass.getuser()
        except (KeyError, OSError):
            actor = str(os.getuid())
    return AuditContext(Principal(subject=f"cli:{actor}", role=Role.OPS, ods="CLI"))


async def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    from cpis_bridge.compose import open_services

    async with open_services(settings) as opened:
        counts = await opened.retention.purge(cli_context(args.actor))
    log.info("retention.purged", extra={"removed": counts})
    print(orjson.dumps({"removed": counts}).decode())
    return 0


async def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    try:
        nhs = NhsNumber.parse(args.nhs_number)
    except InvalidNhsNumber as exc:
        print(f"cpis-bridge export: {exc}", file=sys.stderr)
        return 2
    from cpis_bridge.compose import open_services

    async with open_services(settings) as opened:
        data = await opened.retention.export(cli_context(args.actor), nhs)
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
