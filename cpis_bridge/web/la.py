"""Local-authority API handlers (API.md section 4): records and batch uploads. The LA is always the token's ods."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from cpis_bridge.core.codes import FileCode, RecordCode
from cpis_bridge.core.errors import UnreadableInput, UnsupportedMediaType, ValidationFailed
from cpis_bridge.core.principal import Role
from cpis_bridge.services.records import UploadMeta
from cpis_bridge.web.common import allow, audit_context, json_response, loads_json, principal
from cpis_bridge.web.state import METRICS, RECORDS, SETTINGS
from cpis_bridge.web.uploads import content_type, meta_from_headers, reader_for, spool

routes = web.RouteTableDef()
LA = Role.LOCAL_AUTHORITY
# Any printable localId (braces included: aiohttp's default segment pattern refuses them); "/" arrives as %2F.
RECORD_PATH = "/v1/records/{localId:[^/]+}"


async def read_json(request: web.Request, *, types: tuple[str, ...] = ("application/json",)) -> Any:
    """The request body as JSON: 415 for another content type, 400 for unparsable JSON."""
    if request.content_type not in types:
        raise UnsupportedMediaType(f"the body must be {' or '.join(types)}")
    return loads_json(await request.read())


@routes.put(RECORD_PATH)
@allow(LA)
async def put_record(request: web.Request) -> web.Response:
    service = request.app[RECORDS]
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
    service = request.app[RECORDS]
    record = await service.get(audit_context(request), principal(request).ods, request.match_info["localId"])
    return json_response(service.render(record), headers={"ETag": f'W/"{record.version}"'})


@routes.get("/v1/records")
@allow(LA)
async def list_records(request: web.Request) -> web.Response:
    unknown = set(request.query) - {"nhsNumber"}
    if unknown or "nhsNumber" not in request.query:
        raise UnreadableInput("the only search parameter is nhsNumber, and it is required")
    service = request.app[RECORDS]
    records = await service.list_for_number(audit_context(request), principal(request).ods, request.query["nhsNumber"])
    return json_response({"records": [service.render(r) for r in records]})


@routes.delete(RECORD_PATH)
@allow(LA)
async def delete_record(request: web.Request) -> web.Response:
    await request.app[RECORDS].erase(audit_context(request), principal(request).ods, request.match_info["localId"])
    return web.Response(status=204)


@routes.post("/v1/uploads")
@allow(LA)
async def post_upload(request: web.Request) -> web.Response:
    service = request.app[RECORDS]
    metrics = request.app[METRICS]
    la = principal(request).ods
    ct = content_type(request)
    try:
        meta = meta_from_headers(request) if ct != "application/json" else None
        if meta is not None and meta.sequence is not None:
            stored = await service.check_sequence(la, meta.sequence)
            if stored is not None:
                return json_response(stored, headers={"Upload-Replayed": "true"})
        spooled = await spool(request, request.app[SETTINGS].upload_max_bytes)
        try:
            meta = meta or UploadMeta()
            file_meta = meta
            report, replayed = await service.apply_upload(
                audit_context(request), la, file_meta, lambda: reader_for(ct, spooled, file_meta)
            )
        finally:
            spooled.close()
    except UnreadableInput as exc:
        metrics.uploads.labels(FileCode.UNREADABLE).inc()
        raise ValidationFailed(exc.detail, code=FileCode.UNREADABLE) from None
    if not replayed:
        metrics.uploads.labels(report["fileCode"]).inc()
        metrics.upload_records.labels(RecordCode.UPLOADED).inc(report["accepted"])
        for rejection in report["rejections"]:
            metrics.upload_records.labels(rejection["code"]).inc()
    return json_response(report, headers={"Upload-Replayed": "true"} if replayed else None)


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
