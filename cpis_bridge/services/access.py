"""The access use-case behind every entry point that looks a child up: decide whether the access is unscheduled,
record it (idempotently, on its source event id) and queue the LA notifications in one atomic store step."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cpis_bridge.core.access import HISTORY_LENGTH, Access, Actor
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import Clock, epoch_day, from_epoch_day, today_london, utc_now
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import AccessStore, LookupOutcome, LookupStatus
from cpis_bridge.core.records import Record, VisibilityWindows
from cpis_bridge.core.registry import CareSetting


@dataclass(frozen=True, slots=True)
class LookupRequest:
    """One look-up by a care setting. ``unscheduled_claimed`` is what the caller said (header, or implied)."""

    nhs: NhsNumber
    care_setting: CareSetting
    kind: str  # careteam | flag | encounter | cds-patient-view | cds-encounter-start (audit action suffix)
    unscheduled_claimed: bool = True
    source_event_id: str | None = None
    arrived_at: dt.datetime | None = None
    encounter: Mapping[str, Any] | None = None  # minimal Encounter to retain (POST /fhir/Encounter)
    recent: bool = False  # also return the child's newest accesses (from the same store step)


class AccessService:
    def __init__(
        self,
        store: AccessStore,
        *,
        windows: VisibilityWindows,
        clock: Clock = utc_now,
        on_notified: Callable[[int], object] | None = None,
    ) -> None:
        """``on_notified(n)``: n LA notifications were put in their pull inboxes (one per LA holding a visible
        record, when an access is recorded)."""
        self.store = store
        self.on_notified = on_notified
        self.windows = windows
        self.clock = clock
        self._day: tuple[dt.datetime, dt.datetime, int] | None = None  # [start, end) of a UTC minute, its day

    def _today_day(self, now: dt.datetime) -> int:
        """The Europe/London day (epoch day number) at ``now``, cached per UTC minute: a day always changes on a
        minute boundary, and the zoneinfo conversion is a measurable cost per request."""
        cached = self._day
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        start = now.replace(second=0, microsecond=0)
        day = epoch_day(today_london(now))
        self._day = (start, start + dt.timedelta(minutes=1), day)
        return day

    def today(self) -> dt.date:
        """The Europe/London day now (cached per UTC minute, as for look-ups)."""
        return from_epoch_day(self._today_day(self.clock()))

    @staticmethod
    def is_unscheduled(req: LookupRequest) -> bool:
        """docs/contract.md §3: unscheduled when the caller says so AND the setting is registered as unscheduled."""
        return req.unscheduled_claimed and req.care_setting.unscheduled

    async def lookup(self, ctx: AuditContext, req: LookupRequest) -> LookupOutcome:
        now = self.clock()
        today_day = self._today_day(now)
        unscheduled = self.is_unscheduled(req)
        access: Access | None = None
        if unscheduled:
            p = ctx.principal
            access = Access(
                care_setting=req.care_setting.ods,
                source_event_id=req.source_event_id or secrets.token_urlsafe(12),
                occurred_at=now,
                arrived_at=req.arrived_at,
                actor=Actor(user_id=p.user_ref, user_name=p.name, role_code=p.role_code),
            )
        action = f"lookup.{req.kind}" + ("" if unscheduled else ".silent")
        audit_with = ctx.entry(action, req.nhs, now, unscheduled=unscheduled)
        # the same entry as ctx.entry(action, None, now, unscheduled=..., found=False), without building it again
        audit_without = {**audit_with, "nhsNumber": None, "detail": {"unscheduled": unscheduled, "found": False}}
        out = await self.store.lookup(
            req.nhs,
            today_day=today_day,
            windows=self.windows,
            record_access=access,
            audit_with=audit_with,
            audit_without=audit_without,
            encounter=req.encounter,
            recent=req.recent,
        )
        if out.status == LookupStatus.RECORDED and self.on_notified is not None:
            self.on_notified(len({r.la for r in out.records}))
        return out

    async def history(
        self, nhs: NhsNumber, *, ctx: AuditContext | None = None, kind: str = "history"
    ) -> tuple[list[Record], list[tuple[str, Access]]]:
        """Visible records and the last 25 unscheduled accesses (empty when nothing is visible).

        Never itself an access. With ``ctx`` the read is audited as ``read.<kind>`` (under the keyed hash only,
        without the NHS number, when nothing is visible)."""
        now = self.clock()
        records, accesses = await self.store.history(nhs)
        visible = [r for r in records if r.is_visible(today_london(now), self.windows)]
        if ctx is not None:
            entry = ctx.entry(
                f"read.{kind}",
                nhs if visible else None,
                now,
                found=bool(visible),
                returned=len(accesses[:HISTORY_LENGTH]) if visible else 0,
            )
            await self.store.append_audit(nhs, entry)
        if not visible:
            return [], []
        return visible, accesses[:HISTORY_LENGTH]

    async def keep_practitioner_roles(self, roles: Mapping[str, bytes]) -> None:
        await self.store.keep_practitioner_roles(roles)

    async def practitioner_role(self, role_id: str) -> dict[str, Any] | None:
        """A PractitionerRole an AuditEvent search referred to (users in their care settings; no child's data)."""
        return await self.store.practitioner_role(role_id)

    async def encounter(self, encounter_id: str, *, ctx: AuditContext | None = None) -> dict[str, Any] | None:
        """A retained Encounter by id (the access id). With ``ctx``: only the care setting that sent it sees it
        (others get None), and the read is audited."""
        stored = await self.store.encounter(encounter_id)
        if stored is None or ctx is None:
            return stored
        owner = ((stored.get("serviceProvider") or {}).get("identifier") or {}).get("value")
        if owner != ctx.principal.ods:
            return None  # another care setting's attendance looks absent
        value = str(((stored.get("subject") or {}).get("identifier") or {}).get("value") or "")
        if value:
            nhs = NhsNumber(value)  # as the look-up that kept the Encounter stored it
            await self.store.append_audit(nhs, ctx.entry("read.encounter", nhs, self.clock(), encounterId=encounter_id))
        return stored
