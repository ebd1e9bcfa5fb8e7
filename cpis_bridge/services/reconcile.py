"""Reconcile the Flag sync server with the store (``cpis-bridge reconcile``): compare what the records call for with
our Flags on the server (a FlagCatalogue port, fhir/flag_server.py) and repair drift (missing, wrong status or
period, ours that should be gone, several Flags for one record)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field

from cpis_bridge.core.ports import FlagCatalogue, FlagStatus, FlagWrite, ServerFlag, WriteOutcome
from cpis_bridge.core.records import Record, VisibilityWindows

Tick = Callable[[int], None]


def record_key(record: Record) -> str:
    """The readable key our Flags carry (``"<la>|<localId>"``), by which the catalogue lists them."""
    return f"{record.la}|{record.local_id}"


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


async def compare(
    server: FlagCatalogue,
    records: AsyncIterable[list[Record]],
    *,
    day: dt.date,
    windows: VisibilityWindows,
    tick: Tick | None = None,
) -> tuple[Drift, dict[str, FlagWrite], dict[str, list[ServerFlag]]]:
    """What differs. A record with several live Flags is a duplicate (one is kept, see FlagCatalogue.kept); the kept
    one is compared with the record; Flags already entered-in-error besides the kept one are settled and ignored."""
    wanted: dict[str, FlagWrite] = {}
    async for batch in records:
        for r in batch:
            status = FlagStatus.ACTIVE if r.is_visible(day, windows) else FlagStatus.INACTIVE
            wanted[record_key(r)] = FlagWrite(r, status)
    found = await server.our_flags(tick)
    drift = Drift()
    for key, write in wanted.items():
        have = found.get(key)
        if not have:
            drift.missing.append(key)
            continue
        keep = server.kept(key, have)
        if any(f is not keep for f in server.live(have)):
            drift.duplicates.append(key)
        if not server.describes(keep, write):
            drift.wrong.append(key)
    for key, flags in found.items():
        if key in wanted:
            continue
        if len(server.live(flags)) > 1:
            drift.duplicates.append(key)
        elif server.live(flags):
            drift.extra.append(key)
    return drift, wanted, found


async def repair(
    server: FlagCatalogue,
    drift: Drift,
    wanted: dict[str, FlagWrite],
    found: dict[str, list[ServerFlag]],
    *,
    tick: Tick | None = None,
) -> None:
    """Write what the records call for (to the kept Flag's id when one exists); mark duplicates besides the kept
    Flag, and our Flags without a record, entered-in-error."""
    keys = drift.missing + drift.wrong
    for i in range(0, len(keys), 100):
        chunk = keys[i : i + 100]
        ids = [str(server.kept(k, found[k])["id"]) if found.get(k) else None for k in chunk]
        results = await server.write([wanted[k] for k in chunk], ids)
        drift.failed += [k for k, r in zip(chunk, results, strict=True) if r.outcome != WriteOutcome.OK]
        if tick:
            tick(len(chunk))
    for key in drift.duplicates:
        keep = server.kept(key, found[key]) if key in wanted else None  # no record: every copy goes
        for flag in server.live(found[key]):
            if flag is not keep and not await server.retire(flag):
                drift.failed.append(key)
        if tick:
            tick(1)
    for key in drift.extra:
        for flag in server.live(found[key]):
            if not await server.retire(flag):
                drift.failed.append(key)
        if tick:
            tick(1)
