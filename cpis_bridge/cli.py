"""The ``cpis-bridge`` command: serve, token, upload, reconcile, purge, export, demo. Argument parsing and dispatch
only: serve.py runs the service, commands.py holds the operator's commands, demo.py the demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from cpis_bridge import log as logmod
from cpis_bridge.bootstrap import hash_key
from cpis_bridge.config import Settings
from cpis_bridge.core.principal import Role
from cpis_bridge.workers import worker_count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpis-bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="run the service")
    srv.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="processes serving one port (SO_REUSEPORT); 'auto' = the machine's cores (default 1)",
    )
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
    logmod.configure(settings.log_level, settings.log_format, hash_key(settings))
    if args.command == "serve":
        if args.workers > 1:
            from cpis_bridge.workers import run_workers

            return run(run_workers(settings, args.workers))
        from cpis_bridge.serve import serve

        return run(serve(settings))
    if args.command == "demo":
        from cpis_bridge.demo import run_demo

        return run(run_demo(settings, args))
    from cpis_bridge import commands

    if args.command == "token":
        return commands.cmd_token(settings, args)
    command = {
        "upload": commands.cmd_upload,
        "reconcile": commands.cmd_reconcile,
        "purge": commands.cmd_purge,
        "export": commands.cmd_export,
    }[args.command]
    return run(command(settings, args))


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where available (faster event loop), else asyncio's own."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)
