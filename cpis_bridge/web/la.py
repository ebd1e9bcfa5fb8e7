"""Local-authority API handlers (docs/contract.md §4): records and batch uploads. The LA is always the token's ods."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from cpis_bridge.core.codes import FileCode, RecordCode
from cpis_bridge.core.errors import (
    MassEndRefused,
    UnreadableInput,
    UnsupportedMediaType,
    UploadInterrupted,
    ValidationFailed,
)
from cpis_bridge.core.principal import Role
from cpis_bridge.services.uploads import LEASE_MS, UploadControl, UploadMeta
from cpis_bridge.web.common import allow, audit_context, json_response, loads_json, principal, problem
from cpis_bridge.web.state import LIFECYCLE, METRICS, SERVICES, SETTINGS
from cpis_bridge.web.uploads import content_type, meta_from_headers, spool

routes = web.RouteTableDef()
LA = Role.LOCAL_AUTHORITY
# Any printable localId (braces included: aiohttp's default segment pattern refuses them); "/" arrives as %2F.
RECORD_PATH = "/v1/records/{localId:[^/]+}"
UPLOAD_TASKS = web.AppKey("upload_tasks", set[asyncio.Future[Any]])
ANSWER_MARGIN_S = 0.5  # an interrupted upload is answered this long before the server's grace period ends


async def read_json(request: web.Request, *, types: tuple[str, ...] = ("application/json",)) -> Any:
    """The request body as JSON: 415 for another content type, 400 for unparsable JSON."""
    if request.content_type not in types:
        raise UnsupportedMediaType(f"the body must be {' or '.join(types)}")
    return loads_json(await request.read())


@routes.put(RECORD_PATH)
@allow(LA)
async def put_record(request: web.Request) -> web.Response:
    service = request.app[SERVICES].records
    body = await read_json(request)
    la = principal(request).ods
    try:
        record, created = await service.put(audit_context(request), la, request.match_info["localId"], body)
    except ValidationFailed as exc:
        request.app[METRICS].upload_records.labels(exc.code or RecordCode.VALIDATION_FAILED).inc()
        raise
    request.app[METRICS].upload_records.labels(RecordCode.UPLOADED).inc()
    headers = {"Location": f"/v1/records/{quote(record.local_id, safe='')}", "ETag": f'W/"{record.version}"'}
    return json_response(service.render(record), status=201 if created else 200, headers=headers)


@routes.get(RECORD_PATH)
@allow(LA)
async def get_record(request: web.Request) -> web.Response:
    service = request.app[SERVICES].records
    record = await service.get(audit_context(request), principal(request).ods, request.match_info["localId"])
    return json_response(service.render(record), headers={"ETag": f'W/"{record.version}"'})


@routes.get("/v1/records")
@allow(LA)
async def list_records(request: web.Request) -> web.Response:
    unknown = set(request.query) - {"nhsNumber"}
    if unknown or "nhsNumber" not in request.query:
        raise UnreadableInput("the only search parameter is nhsNumber, and it is required")
    service = request.app[SERVICES].records
    records = await service.list_for_number(audit_context(request), principal(request).ods, request.query["nhsNumber"])
    return json_response({"records": [service.render(r) for r in records]})


@routes.delete(RECORD_PATH)
@allow(LA)
async def delete_record(request: web.Request) -> web.Response:
    await request.app[SERVICES].records.erase(
        audit_context(request), principal(request).ods, request.match_info["localId"]
    )
    return web.Response(status=204)


@routes.post("/v1/uploads")
@allow(LA)
async def post_upload(request: web.Request) -> web.Response:
    uploads = request.app[SERVICES].uploads
    metrics = request.app[METRICS]
    la = principal(request).ods
    ct = content_type(request)
    try:
        meta = meta_from_headers(request) if ct != "application/json" else UploadMeta()
        if meta.sequence is not None and (stored := await uploads.check_sequence(la, meta.sequence)) is not None:
            return json_response(stored, headers={"Upload-Replayed": "true"})
        control = UploadControl()
        task = asyncio.ensure_future(_upload(request, la, meta, ct, control))
        report, replayed = await _answer_before_shutdown(request, task, control)
    except UnreadableInput as exc:
        metrics.uploads.labels(FileCode.UNREADABLE).inc()
        raise ValidationFailed(exc.detail, code=FileCode.UNREADABLE) from None
    except MassEndRefused as exc:
        return problem(422, exc.title, exc.detail, code=exc.code, extra={"wouldEnd": exc.would_end})
    except UploadInterrupted as exc:
        return problem(503, exc.title, exc.detail, headers={"Retry-After": str(LEASE_MS // 1000)})
    if not replayed:
        metrics.uploads.labels(report["fileCode"]).inc()
        metrics.upload_records.labels(RecordCode.UPLOADED).inc(report["accepted"])
        for rejection in report["rejections"]:
            metrics.upload_records.labels(rejection["code"]).inc()
    return json_response(report, headers={"Upload-Replayed": "true"} if replayed else None)


def _confirm_end(request: web.Request) -> int | None:
    """``Upload-Confirm-End``: the number of records the sender knows a full upload ends (anything else: none)."""
    value = request.headers.get("Upload-Confirm-End", "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else None


async def _upload(
    request: web.Request, la: str, meta: UploadMeta, ct: str, control: UploadControl
) -> tuple[dict[str, Any], bool]:
    spooled = await spool(request, request.app[SETTINGS].upload_max_bytes)
    try:
        return await request.app[SERVICES].uploads.apply_upload(
            audit_context(request), la, meta, ct, spooled, confirm_end=_confirm_end(request), control=control
        )
    finally:
        spooled.close()


async def _answer_before_shutdown(
    request: web.Request, task: asyncio.Future[tuple[dict[str, Any], bool]], control: UploadControl
) -> tuple[dict[str, Any], bool]:
    """The upload's result; or, once the process is stopping, an answer just before the server's grace period ends.
    An upload that has not committed by then stops, having applied nothing; a committed one (journalled: this
    process or the next completes it, and a re-send of its sequence answers its report) is answered 503."""
    life, settings = request.app[LIFECYCLE], request.app[SETTINGS]
    answer_by: float | None = None
    control.answer_by = lambda: answer_by
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if done:
            return task.result()
        if not life.draining:
            continue
        if answer_by is None:
            answer_by = time.monotonic() + settings.drain_delay_s + settings.shutdown_grace_s - ANSWER_MARGIN_S
        if time.monotonic() < answer_by:
            continue
        if not control.committed:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise UploadInterrupted(
                "the service is stopping; nothing of this upload was applied: send it again", applied=False
            )
        request.app[UPLOAD_TASKS].add(task)  # cancelled at cleanup; the journal outlives it
        task.add_done_callback(_forget(request.app))
        raise UploadInterrupted(
            "the service is stopping while this upload is applied; the service completes it: send the same "
            "sequence again for its report",
            applied=True,
        )


def _forget(app: web.Application) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        app[UPLOAD_TASKS].discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an interrupted upload's error is the journal's to resolve

    return done


async def uploads_ctx(app: web.Application) -> AsyncIterator[None]:
    """Uploads being completed after their request was answered (the service stopping): cancelled on the way out,
    their journal outlives them. (The task completing uploads of processes that died is the app's.)"""
    app[UPLOAD_TASKS] = set()
    yield
    tasks = [*app[UPLOAD_TASKS]]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
    app.cleanup_ctx.append(uploads_ctx)
