"""The sync server as core.ports.FlagServer, and as FlagCatalogue for reconcile: CapabilityStatement check, write
mode (id / conditional / auto, with a probe), single PUTs or `batch` Bundles, and each answer settled as ok / retry /
conflict / dead (an unknown outcome verified by reading, an uninformative 412 resolved by a search on the identifier);
our Flags listed, kept, compared and retired."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import orjson

from cpis_bridge.core.backoff import retry_after_s
from cpis_bridge.core.ports import FlagWrite, ServerFlag, WriteOutcome, WriteResult
from cpis_bridge.fhir.client import (
    AuthFailed,
    FhirClient,
    FhirUnavailable,
    ratelimit_reset_s,
)
from cpis_bridge.fhir.flag_sync import (
    ENTERED_IN_ERROR,
    IDENTIFIER_SYSTEM,
    conditional_url,
    flag_id,
    keep_flag,
    our_key,
    record_flag,
    record_key,
    summary,
)
from cpis_bridge.fhir.outcome import operation_outcome

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
    """2xx ok; 408/429/5xx retry (Retry-After, or the rate-limit reset on a 429); 409 and a version 412 conflict;
    412 multiple-matches and every other 4xx dead, with the OperationOutcome kept."""
    outcome = _outcome_json(body)
    if 200 <= status < 300:
        return WriteResult(WriteOutcome.OK, status)
    if status in (408, 429) or status >= 500:
        wait = None
        if headers is not None:
            wait = retry_after_s(headers.get("Retry-After")) if status in (429, 503) else None
            if wait is None and status == 429:
                wait = ratelimit_reset_s(headers)
        return WriteResult(WriteOutcome.RETRY, status, f"HTTP {status}", outcome, wait)
    if status == 412 and _multiple_matches(body):
        return WriteResult(WriteOutcome.DEAD, status, "multiple-matches", outcome)
    if status in (409, 412):
        return WriteResult(WriteOutcome.CONFLICT, status, f"HTTP {status}", outcome)
    return WriteResult(WriteOutcome.DEAD, status, f"HTTP {status}", outcome)


def _entry_status(entry: Mapping[str, Any]) -> tuple[int, Mapping[str, Any] | None]:
    response = entry.get("response") or {}
    try:
        status = int(str(response.get("status", "0")).split()[0])
    except (ValueError, IndexError):
        status = 0
    return status, response.get("outcome")


def _unavailable(exc: Exception) -> WriteResult:
    return WriteResult(WriteOutcome.RETRY, 0, str(exc))


#: After a server refuses a batch Bundle (4xx), single requests for this long, then batches are tried again.
BATCH_RETRY_S = 300.0


class FhirFlagServer:
    """Writes Flags to one server. ``mode`` is id, conditional or auto: with auto, the CapabilityStatement's
    ``updateCreate`` means id; without it, one ``PUT Flag/{uuid}`` is tried and id kept if it is accepted (so the
    server's ids equal the ED API's wherever the server allows it), else conditional."""

    def __init__(
        self,
        client: FhirClient,
        *,
        mode: str = "auto",
        batch_above: int = 4,
        bundle_size: int = 100,
        bundles_in_flight: int = 2,
    ) -> None:
        self.client = client
        self.setting = mode
        self.mode: str | None = None if mode == "auto" else mode
        self.capabilities: Capabilities | None = None
        self.batch_above = batch_above
        self.bundle_size = bundle_size
        self.bundles = asyncio.Semaphore(bundles_in_flight)
        self.batch_off_until = 0.0  # time.monotonic()

    def pause(self, seconds: float) -> None:
        self.client.pause(seconds)

    def resume(self) -> None:
        self.client.resume()

    def paused_for(self) -> float:
        return self.client.paused_for()

    @property
    def reachable(self) -> bool:
        return self.client.reachable

    async def probe(self) -> bool:
        """Whether the server answers at all (its CapabilityStatement), for a relay waiting out an outage."""
        try:
            if self.capabilities is None:
                await self.prepare()
            else:
                await self.client.capabilities()
        except (FhirUnavailable, AuthFailed):
            return False
        return True

    @property
    def use_batch(self) -> bool:
        return bool(self.capabilities and self.capabilities.batch) and time.monotonic() >= self.batch_off_until

    @property
    def serialised(self) -> bool:
        """Conditional writes are not race-safe on common servers: one writer per identifier at a time."""
        return self.mode != "id"

    async def prepare(self) -> Capabilities:
        """Read the CapabilityStatement, log what it means, pick the write mode when auto (or leave it to the first
        write's probe). Raises FhirUnavailable."""
        caps = read_capabilities(await self.client.capabilities())
        self.capabilities = caps
        if self.setting == "auto" and self.mode is None:
            if caps.update_create or not caps.conditional_update:
                self.mode = "id"
        problems = []
        if not caps.r4:
            problems.append(f"fhirVersion {caps.fhir_version or 'missing'} is not 4.0.x")
        if not caps.update:
            problems.append("Flag update is not declared")
        if self.setting == "id" and not caps.update_create:
            problems.append("updateCreate is not declared (PUT Flag/{id} may be refused)")
        if self.mode == "conditional" and not caps.conditional_update:
            problems.append("conditionalUpdate is not declared")
        extra = {
            "fhirVersion": caps.fhir_version,
            "mode": self.mode or "probe",
            "batch": caps.batch,
            "updateCreate": caps.update_create,
            "conditionalUpdate": caps.conditional_update,
        }
        if problems:
            log.warning("fhir.capabilities.mismatch: " + "; ".join(problems), extra=extra)
        else:
            log.info("fhir.capabilities.ok", extra=extra)
        return caps

    # -- writing ----------------------------------------------------------------------------------------------
    def _target(self, write: FlagWrite, fid: str | None = None) -> tuple[str, dict[str, Any]]:
        flag = record_flag(write.record, write.status)
        if fid is not None:
            flag["id"] = fid
        elif self.mode == "conditional":
            flag.pop("id")
            return conditional_url(write.record.la, write.record.local_id), flag
        return f"Flag/{flag['id']}", flag

    async def write(self, writes: Sequence[FlagWrite], ids: Sequence[str | None] | None = None) -> list[WriteResult]:
        """Write each Flag (to ``ids[i]`` when given: an existing Flag's server id) and settle each answer."""
        if not writes:
            return []
        targets = list(ids) if ids is not None else [None] * len(writes)
        if self.capabilities is None:
            try:
                await self.prepare()
            except (FhirUnavailable, AuthFailed) as exc:
                if self.mode is None:  # auto mode cannot choose without the CapabilityStatement
                    log.warning("fhir.capabilities.unavailable", extra={"error": str(exc)})
                    return [_unavailable(exc)] * len(writes)
        head: list[WriteResult] = []
        if self.mode is None:
            first = await self._probe(writes[0])
            if self.mode is None:
                return [first] * len(writes)
            if first.outcome == WriteOutcome.OK:
                head, writes, targets = [first], writes[1:], targets[1:]
        if self.use_batch and len(writes) > self.batch_above:
            chunks = [
                (writes[i : i + self.bundle_size], targets[i : i + self.bundle_size])
                for i in range(0, len(writes), self.bundle_size)
            ]
            parts = await asyncio.gather(*(self._bundle(w, t) for w, t in chunks))
            return head + [r for part in parts for r in part]
        return head + await self._singles(writes, targets)

    async def _probe(self, write: FlagWrite) -> WriteResult:
        """auto without updateCreate: does ``PUT Flag/{uuid}`` create? Decides the mode unless the answer is
        transient (then the next write asks again)."""
        url, flag = f"Flag/{flag_id(write.record.la, write.record.local_id)}", record_flag(write.record, write.status)
        try:
            resp = await self.client.request("PUT", url, flag, {"Prefer": "return=minimal"})
        except (FhirUnavailable, AuthFailed) as exc:
            return _unavailable(exc)
        result = classify(resp.status, resp.body, resp.headers)
        if result.outcome == WriteOutcome.RETRY or resp.status in (401, 403):
            return result
        self.mode = "id" if result.outcome == WriteOutcome.OK else "conditional"
        log.info("fhir.write_mode.chosen", extra={"mode": self.mode, "probeStatus": resp.status})
        return result

    async def _singles(self, writes: Sequence[FlagWrite], targets: Sequence[str | None]) -> list[WriteResult]:
        return list(await asyncio.gather(*(self._single(w, t) for w, t in zip(writes, targets, strict=True))))

    async def _single(self, write: FlagWrite, fid: str | None, resolve: bool = True) -> WriteResult:
        url, flag = self._target(write, fid)
        try:
            resp = await self.client.request("PUT", url, flag, {"Prefer": "return=minimal"})
        except (FhirUnavailable, AuthFailed) as exc:
            return _unavailable(exc)
        return await self._settle(write, resp.status, resp.body, resp.headers, resolve)

    async def _settle(
        self,
        write: FlagWrite,
        status: int,
        body: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        resolve: bool = True,
    ) -> WriteResult:
        result = classify(status, body, headers)
        if status == 412 and resolve and (_outcome_json(body) is None or _multiple_matches(body)):
            return await self._resolve_412(write, result)
        return result

    async def matches(self, write: FlagWrite) -> list[dict[str, Any]] | None:
        """The server's Flags carrying this record's identifier (None when the search fails)."""
        key = record_key(write.record.la, write.record.local_id)
        try:
            resp = await self.client.request("GET", conditional_url(write.record.la, write.record.local_id))
        except (FhirUnavailable, AuthFailed):
            return None
        if not resp.ok or not resp.body or resp.body.get("resourceType") != "Bundle":
            return None
        flags = [(e.get("resource") or {}) for e in resp.body.get("entry") or []]
        return [f for f in flags if f.get("resourceType") == "Flag" and our_key(f) == key]

    async def _resolve_412(self, write: FlagWrite, first: WriteResult) -> WriteResult:
        """A 412 says too little (often nothing): search the identifier. One Flag or none: a version conflict, to
        retry. Several, of which at most one is live (the others entered-in-error, as reconcile leaves them): write
        to the live one by id. Several live: dead-letter as multiple-matches (``reconcile`` repairs duplicates)."""
        found = await self.matches(write)
        if found is None:
            return WriteResult(
                WriteOutcome.RETRY, first.status, "412, identifier search failed", first.operation_outcome
            )
        live = [f for f in found if f.get("status") != ENTERED_IN_ERROR]
        if len(found) <= 1:
            return WriteResult(WriteOutcome.CONFLICT, 412, "version-conflict", first.operation_outcome)
        if len(live) > 1:
            text = f"{len(live)} live Flags carry this identifier; cpis-bridge reconcile repairs duplicates"
            told = first.operation_outcome or orjson.dumps(operation_outcome(412, text, code="multiple-matches"))
            return WriteResult(
                WriteOutcome.DEAD, 412, "multiple-matches", told if isinstance(told, str) else told.decode()
            )
        keep = live[0] if live else keep_flag(found, flag_id(write.record.la, write.record.local_id))
        return await self._single(write, str(keep["id"]), resolve=False)

    async def _verify(self, writes: Sequence[FlagWrite], targets: Sequence[str | None]) -> list[WriteResult]:
        """The outcome of these writes is unknown (an empty or unusable 2xx answer): read what the server holds;
        what already matches is done, the rest is sent again singly."""

        async def one(write: FlagWrite, fid: str | None) -> WriteResult:
            found = await self.matches(write)
            if found is None:
                return WriteResult(WriteOutcome.RETRY, 0, "outcome unknown, verification search failed")
            want = summary(record_flag(write.record, write.status))
            live = [f for f in found if f.get("status") != ENTERED_IN_ERROR]
            if len(live) <= 1 and any(summary(f) == want for f in found):
                return WriteResult(WriteOutcome.OK, 200, "verified")
            return await self._single(write, fid)

        return list(await asyncio.gather(*(one(w, t) for w, t in zip(writes, targets, strict=True))))

    async def _bundle(self, writes: Sequence[FlagWrite], targets: Sequence[str | None]) -> list[WriteResult]:
        entries = []
        for write, fid in zip(writes, targets, strict=True):
            url, flag = self._target(write, fid)
            entries.append({"resource": flag, "request": {"method": "PUT", "url": url}})
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        async with self.bundles:
            try:
                # no Prefer return=minimal: servers then answer an empty 200 instead of the batch-response
                resp = await self.client.request("POST", "", bundle)
            except (FhirUnavailable, AuthFailed) as exc:
                return [_unavailable(exc)] * len(writes)
        whole = classify(resp.status, resp.body, resp.headers)
        if whole.outcome == WriteOutcome.RETRY:
            return [whole] * len(writes)
        if not resp.ok:  # the server refused the batch itself: single requests for a while, then batches again
            log.warning("fhir.batch.refused", extra={"status": resp.status, "retryBatchInS": BATCH_RETRY_S})
            self.batch_off_until = time.monotonic() + BATCH_RETRY_S
            return await self._singles(writes, targets)
        body = resp.body or {}
        answers = body.get("entry") or []
        if body.get("resourceType") != "Bundle" or len(answers) != len(writes):
            log.warning("fhir.batch.unknown", extra={"status": resp.status, "entries": len(writes)})
            return await self._verify(writes, targets)
        statuses = [_entry_status(a) for a in answers]
        unknown = [i for i, (status, _) in enumerate(statuses) if status == 0]
        settled = await asyncio.gather(
            *(
                self._settle(w, status, body, None)
                for w, (status, body) in zip(writes, statuses, strict=True)
                if status != 0
            )
        )
        results: list[WriteResult | None] = [None] * len(writes)
        it = iter(settled)
        for i, (status, _) in enumerate(statuses):
            if status != 0:
                results[i] = next(it)
        if unknown:
            for i, r in zip(
                unknown, await self._verify([writes[i] for i in unknown], [targets[i] for i in unknown]), strict=True
            ):
                results[i] = r
        return [r for r in results if r is not None]

    # -- core.ports.FlagCatalogue (reconcile) -------------------------------------------------------------------
    async def our_flags(
        self, tick: Callable[[int], None] | None = None, *, page_size: int = 200, max_pages: int = 100_000
    ) -> dict[str, list[ServerFlag]]:
        """Every Flag on the server carrying our identifier system, by readable key (following `next` links)."""
        url: str | None = f"Flag?identifier={quote(IDENTIFIER_SYSTEM, safe='')}%7C&_count={page_size}"
        found: dict[str, list[ServerFlag]] = {}
        for _ in range(max_pages):
            if url is None:
                break
            resp = await self.client.request("GET", url)
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
            links = resp.body.get("link") or []
            url = next((link.get("url") for link in links if link.get("relation") == "next"), None)
        return found

    def kept(self, key: str, flags: Sequence[ServerFlag]) -> ServerFlag:
        """Of a record's Flags, the one to keep (flag_sync.keep_flag)."""
        la, _, local_id = key.partition("|")
        return keep_flag(cast(list[dict[str, Any]], list(flags)), flag_id(la, local_id))  # the same objects

    def live(self, flags: Sequence[ServerFlag]) -> list[ServerFlag]:
        return [f for f in flags if f.get("status") != ENTERED_IN_ERROR]

    def describes(self, flag: ServerFlag, write: FlagWrite) -> bool:
        """The server Flag says what the write calls for (status, period, subject, code, author)."""
        return summary(dict(flag)) == summary(record_flag(write.record, write.status))

    async def retire(self, flag: ServerFlag) -> bool:
        """Mark one server Flag entered-in-error (kept, not deleted), by its server id."""
        body = {k: v for k, v in flag.items() if k != "meta"}
        body["status"] = ENTERED_IN_ERROR
        resp = await self.client.request("PUT", f"Flag/{flag['id']}", body)
        return classify(resp.status, resp.body, resp.headers).outcome == WriteOutcome.OK
