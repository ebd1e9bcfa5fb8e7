"""The sync server as core.ports.FlagServer: CapabilityStatement check, write mode (id / conditional / auto),
single PUTs or `batch` Bundles, and each answer classified as ok / retry / conflict / dead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from cpis_bridge.core.ports import FlagWrite, WriteResult
from cpis_bridge.fhir.client import FhirClient, FhirResponse, FhirUnavailable, ratelimit_reset_s, retry_after_s
from cpis_bridge.fhir.flag_sync import conditional_url, record_flag

log = logging.getLogger("cpis_bridge.fhir.sync")


@dataclass(frozen=True, slots=True)
class Capabilities:
    fhir_version: str
    update: bool
    update_create: bool
    conditional_update: bool
    batch: bool

    @property
    def r4(self) -> bool:
        return self.fhir_version.startswith("4.0")


def read_capabilities(cs: Mapping[str, Any]) -> Capabilities:
    update = update_create = conditional = batch = False
    for rest in cs.get("rest") or []:
        if rest.get("mode", "server") != "server":
            continue
        batch = batch or any(i.get("code") == "batch" for i in rest.get("interaction") or [])
        for res in rest.get("resource") or []:
            if res.get("type") == "Flag":
                update = any(i.get("code") == "update" for i in res.get("interaction") or [])
                update_create = bool(res.get("updateCreate"))
                conditional = bool(res.get("conditionalUpdate"))
    return Capabilities(str(cs.get("fhirVersion", "")), update, update_create, conditional, batch)


def _outcome_json(body: Mapping[str, Any] | None) -> str | None:
    if body and body.get("resourceType") == "OperationOutcome":
        return orjson.dumps(body).decode()
    return None


def _multiple_matches(body: Mapping[str, Any] | None) -> bool:
    for issue in (body or {}).get("issue") or []:
        text = f"{issue.get('code', '')} {issue.get('diagnostics', '')}".lower()
        if "multiple" in text or ("matched" in text and "resources" in text):
            return True
    return False


def classify(status: int, body: Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> WriteResult:
    """API.md section 5: 2xx ok; 408/429/5xx retry (Retry-After or RateLimit t=); 409 and version 412 conflict;
    412 multiple-matches and every other 4xx dead, with the OperationOutcome kept."""
    outcome = _outcome_json(body)
    if 200 <= status < 300:
        return WriteResult("ok", status)
    if status in (408, 429) or status >= 500:
        wait = None
        if headers is not None:
            wait = retry_after_s(headers.get("Retry-After")) if status in (429, 503) else None
            if wait is None and status == 429:
                wait = ratelimit_reset_s(headers)
        return WriteResult("retry", status, f"HTTP {status}", outcome, wait)
    if status == 412 and _multiple_matches(body):
        return WriteResult("dead", status, "multiple-matches", outcome)
    if status in (409, 412):
        return WriteResult("conflict", status, f"HTTP {status}", outcome)
    return WriteResult("dead", status, f"HTTP {status}", outcome)


def _entry_status(entry: Mapping[str, Any]) -> tuple[int, Mapping[str, Any] | None]:
    response = entry.get("response") or {}
    try:
        status = int(str(response.get("status", "0")).split()[0])
    except (ValueError, IndexError):
        status = 0
    return status, response.get("outcome")


class FhirFlagServer:
    """Writes Flags to one server. ``mode`` is id, conditional or auto (decided by :meth:`prepare`)."""

    def __init__(self, client: FhirClient, *, mode: str = "auto", batch_above: int = 4, bundle_size: int = 100,
                 concurrency: int = 8, bundles_in_flight: int = 2) -> None:
        self.client = client
        self.setting = mode
        self.mode: str | None = None if mode == "auto" else mode
        self.capabilities: Capabilities | None = None
        self.batch_above = batch_above
        self.bundle_size = bundle_size
        self.concurrency = concurrency
        self.bundles_in_flight = bundles_in_flight
        self.use_batch = False

    def pause(self, seconds: float) -> None:
        self.client.pause(seconds)

    async def prepare(self) -> Capabilities:
        """Read the CapabilityStatement, log what it means, pick the write mode when auto. Raises FhirUnavailable."""
        caps = read_capabilities(await self.client.capabilities())
        self.capabilities = caps
        self.use_batch = caps.batch
        if self.setting == "auto":
            self.mode = "id" if caps.update_create or not caps.conditional_update else "conditional"
        problems = []
        if not caps.r4:
            problems.append(f"fhirVersion {caps.fhir_version or 'missing'} is not 4.0.x")
        if not caps.update:
            problems.append("Flag update is not declared")
        if self.mode == "id" and not caps.update_create:
            problems.append("updateCreate is not declared (PUT Flag/{id} may be refused)")
        if self.mode == "conditional" and not caps.conditional_update:
            problems.append("conditionalUpdate is not declared")
        extra = {"fhirVersion": caps.fhir_version, "mode": self.mode, "batch": caps.batch,
                 "updateCreate": caps.update_create, "conditionalUpdate": caps.conditional_update}
        if problems:
            log.warning("fhir.capabilities.mismatch: " + "; ".join(problems), extra=extra)
        else:
            log.info("fhir.capabilities.ok", extra=extra)
        return caps

    # -- writing ----------------------------------------------------------------------------------------------
    def _target(self, write: FlagWrite) -> tuple[str, dict[str, Any]]:
        flag = record_flag(write.record, write.status)
        if self.mode == "conditional":
            flag.pop("id")
            return conditional_url(write.record.la, write.record.local_id), flag
        return f"Flag/{flag['id']}", flag

    async def write(self, writes: Sequence[FlagWrite]) -> list[WriteResult]:
        if not writes:
            return []
        if self.mode is None or self.capabilities is None:
            try:
                await self.prepare()
            except FhirUnavailable as exc:
                if self.mode is None:  # auto mode cannot choose without the CapabilityStatement
                    log.warning("fhir.capabilities.unavailable", extra={"error": str(exc)})
                    return [WriteResult("retry", 0, "capabilities unavailable")] * len(writes)
        if self.use_batch and len(writes) > self.batch_above:
            gate = asyncio.Semaphore(self.bundles_in_flight)

            async def bundle(chunk: Sequence[FlagWrite]) -> list[WriteResult]:
                async with gate:
                    return await self._bundle(chunk)

            chunks = [writes[i : i + self.bundle_size] for i in range(0, len(writes), self.bundle_size)]
            return [r for part in await asyncio.gather(*(bundle(c) for c in chunks)) for r in part]
        return await self._singles(writes)

    async def _singles(self, writes: Sequence[FlagWrite]) -> list[WriteResult]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(write: FlagWrite) -> WriteResult:
            url, flag = self._target(write)
            async with gate:
                try:
                    resp = await self.client.request("PUT", url, flag, {"Prefer": "return=minimal"})
                except FhirUnavailable as exc:
                    return WriteResult("retry", 0, str(exc))
            return classify(resp.status, resp.body, resp.headers)

        return list(await asyncio.gather(*(one(w) for w in writes)))

    async def _bundle(self, writes: Sequence[FlagWrite]) -> list[WriteResult]:
        entries = []
        for write in writes:
            url, flag = self._target(write)
            entries.append({"resource": flag, "request": {"method": "PUT", "url": url}})
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        try:
            resp = await self.client.request("POST", "", bundle, {"Prefer": "return=minimal"})
        except FhirUnavailable as exc:
            return [WriteResult("retry", 0, str(exc))] * len(writes)
        return await self._bundle_results(resp, writes)

    async def _bundle_results(self, resp: FhirResponse, writes: Sequence[FlagWrite]) -> list[WriteResult]:
        whole = classify(resp.status, resp.body, resp.headers)
        if whole.outcome == "retry":
            return [whole] * len(writes)
        body = resp.body or {}
        entries = body.get("entry") or []
        if whole.outcome != "ok" or body.get("resourceType") != "Bundle" or len(entries) != len(writes):
            # the server refused the batch itself (unsupported, malformed answer): fall back to single requests
            log.warning("fhir.batch.refused", extra={"status": resp.status})
            self.use_batch = False
            return await self._singles(writes)
        results = []
        for entry in entries:
            status, outcome = _entry_status(entry)
            results.append(classify(status, outcome, None))
        return results
