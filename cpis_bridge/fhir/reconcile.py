"""Reconcile the sync server with the store: list our Flags (search by our identifier system, paging), compare
with what the records call for, and repair drift (missing, wrong status/period, ours that should be gone, several
Flags for one record)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from cpis_bridge.core.ports import FlagWrite, WriteOutcome
from cpis_bridge.core.records import Record, VisibilityWindows
from cpis_bridge.fhir.client import FhirUnavailable
from cpis_bridge.fhir.flag_server import FhirFlagServer, classify
from cpis_bridge.fhir.flag_sync import (
    ACTIVE,
    ENTERED_IN_ERROR,
    IDENTIFIER_SYSTEM,
    INACTIVE,
    flag_id,
    keep_flag,
    our_key,
    record_flag,
    record_key,
    summary,
)

Tick = Callable[[int], None]


@dataclass
class Drift:
    missing: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # ours on the server, no record: should be entered-in-error
    duplicates: list[str] = field(default_factory=list)  # several live Flags for one record: keep one
    failed: list[str] = field(default_factory=list)  # repairs the server refused

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.wrong) + len(self.extra) + len(self.duplicates)

    def counts(self) -> dict[str, int]:
        return {
            "missing": len(self.missing),
            "wrong": len(self.wrong),
            "extra": len(self.extra),
            "duplicates": len(self.duplicates),
            "failed": len(self.failed),
        }


async def server_flags(
    server: FhirFlagServer, *, page_size: int = 200, tick: Tick | None = None, max_pages: int = 100_000
) -> dict[str, list[dict[str, Any]]]:
    """Every Flag on the server carrying our identifier system, by readable key (following `next` links)."""
    url: str | None = f"Flag?identifier={quote(IDENTIFIER_SYSTEM, safe='')}%7C&_count={page_size}"
    found: dict[str, list[dict[str, Any]]] = {}
    for _ in range(max_pages):
        if url is None:
            break
        resp = await server.client.request("GET", url)
        if not resp.ok or not resp.body:
            raise FhirUnavailable(f"Flag search answered {resp.status}")
        entries = resp.body.get("entry") or []
        for entry in entries:
            flag = entry.get("resource") or {}
            key = our_key(flag)
            if flag.get("resourceType") == "Flag" and key is not None:
                found.setdefault(key, []).append(flag)
        if tick:
            tick(len(entries))
        url = next((link.get("url") for link in resp.body.get("link") or [] if link.get("relation") == "next"), None)
    return found


def _live(flags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in flags if f.get("status") != ENTERED_IN_ERROR]


def kept(key: str, flags: list[dict[str, Any]]) -> dict[str, Any]:
    la, _, local_id = key.partition("|")
    return keep_flag(flags, flag_id(la, local_id))


async def compare(
    server: FhirFlagServer,
    records: AsyncIterable[list[Record]],
    *,
    day: dt.date,
    windows: VisibilityWindows,
    tick: Tick | None = None,
) -> tuple[Drift, dict[str, FlagWrite], dict[str, list[dict[str, Any]]]]:
    """What differs. A record with several live Flags is a duplicate (one is kept, see keep_flag); the kept one is
    compared with the record; Flags already entered-in-error besides the kept one are settled and ignored."""
    wanted: dict[str, FlagWrite] = {}
    async for batch in records:
        for r in batch:
            wanted[record_key(r.la, r.local_id)] = FlagWrite(r, ACTIVE if r.is_visible(day, windows) else INACTIVE)
    found = await server_flags(server, tick=tick)
    drift = Drift()
    for key, write in wanted.items():
        have = found.get(key)
        if not have:
            drift.missing.append(key)
            continue
        keep = kept(key, have)
        if any(f is not keep for f in _live(have)):
            drift.duplicates.append(key)
        if summary(keep) != summary(record_flag(write.record, write.status)):
            drift.wrong.append(key)
    for key, flags in found.items():
        if key in wanted:
            continue
        if len(_live(flags)) > 1:
            drift.duplicates.append(key)
        elif _live(flags):
            drift.extra.append(key)
    return drift, wanted, found


async def _retire(server: FhirFlagServer, flag: dict[str, Any]) -> bool:
    """Mark one server Flag entered-in-error (kept, not deleted), by its server id."""
    body = {k: v for k, v in flag.items() if k != "meta"}
    body["status"] = ENTERED_IN_ERROR
    resp = await server.client.request("PUT", f"Flag/{flag['id']}", body)
    return classify(resp.status, resp.body, resp.headers).outcome == WriteOutcome.OK


async def repair(
    server: FhirFlagServer,
    drift: Drift,
    wanted: dict[str, FlagWrite],
    found: dict[str, list[dict[str, Any]]],
    *,
    tick: Tick | None = None,
) -> None:
    """Write what the records call for (to the kept Flag's id when one exists); mark duplicates besides the kept
    Flag, and our Flags without a record, entered-in-error."""
    keys = drift.missing + drift.wrong
    for i in range(0, len(keys), 100):
        chunk = keys[i : i + 100]
        ids = [str(kept(k, found[k])["id"]) if found.get(k) else None for k in chunk]
        results = await server.write([wanted[k] for k in chunk], ids)
        drift.failed += [k for k, r in zip(chunk, results, strict=True) if r.outcome != WriteOutcome.OK]
        if tick:
            tick(len(chunk))
    for key in drift.duplicates:
        keep = kept(key, found[key]) if key in wanted else None  # no record: every copy goes
        for flag in _live(found[key]):
            if flag is not keep and not await _retire(server, flag):
                drift.failed.append(key)
        if tick:
            tick(1)
    for key in drift.extra:
        for flag in _live(found[key]):
            if not await _retire(server, flag):
                drift.failed.append(key)
        if tick:
            tick(1)
