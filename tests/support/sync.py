"""Helpers shared by the Flag sync tests: an app with sync configured but its relays off (the tests drive the
relay and scheduler with an injected clock), draining the queue, and the store's expected Flag state."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from cpis_bridge.app import KEYS, REDIS, SCRIPTS, create_app
from cpis_bridge.compose import FlagSyncParts, flag_sync_parts
from cpis_bridge.config import Settings
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import epoch_ms, today_london
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.records import RecordService
from cpis_bridge.web.state import SERVICES
from tests.support.clock import ShiftedClock

LA_CTX = {
    la: AuditContext(
        Principal(subject=f"u-{la}", role=Role.LOCAL_AUTHORITY, ods=la, name="Test User", role_code="R0001")
    )
    for la in ("LA001", "LA002")
}


@dataclass
class SyncEnv:
    app: web.Application
    parts: FlagSyncParts
    session: aiohttp.ClientSession
    clock: ShiftedClock
    settings: Settings

    @property
    def records(self) -> RecordService:
        return self.app[SERVICES].records

    async def put(self, lid: str, body: dict[str, Any], la: str = "LA001") -> None:
        await self.records.put(LA_CTX[la], la, lid, body)

    async def erase(self, lid: str, la: str = "LA001") -> None:
        await self.records.erase(LA_CTX[la], la, lid)

    async def drain(self, timeout_s: float = 20.0) -> None:
        """Run the relay until nothing waits (queue and retries), bounded in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.parts.relay.run_once()
            pending, _ = await self.parts.queue.stats(epoch_ms(self.clock()))
            if pending == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the sync queue did not drain in time")

    async def expected(self) -> dict[str, tuple[Any, ...]]:
        """identifier value -> (status, start, end, nhs) as the store says now."""
        day = today_london(self.clock())
        out: dict[str, tuple[Any, ...]] = {}
        async for batch in self.parts.queue.all_records():
            for r in batch:
                status = "active" if r.is_visible(day, self.settings.windows) else "inactive"
                out[f"{r.la}|{r.local_id}"] = (
                    status,
                    r.start_date.isoformat(),
                    None if r.end_date is None else r.end_date.isoformat(),
                    str(r.nhs_number),
                )
        return out

    async def dead(self) -> list[dict[str, str]]:
        return await self.parts.queue.dead_letters()


async def make_env(aiohttp_client: Any, settings: Settings, *, timeout_s: float = 15.0) -> SyncEnv:
    client = await aiohttp_client(create_app(settings))
    app = client.app
    session = aiohttp.ClientSession()
    clock = ShiftedClock()
    parts = flag_sync_parts(settings, app[REDIS], app[KEYS], app[SCRIPTS], session, clock=clock)
    parts.server.client.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5.0))
    parts.relay.block_ms = 20
    await parts.queue.ensure_group()
    return SyncEnv(app, parts, session, clock, settings)
