"""CDS Hooks 2.0 handlers: discovery (public) and the cpis-patient-view / cpis-encounter-start services. They read
the NHS number from prefetch (or the hook's fhirServer) and answer warning cards; accesses go via AccessService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from cpis_bridge.core.errors import NotFound, PreconditionFailed, UnreadableInput, UnsupportedMediaType
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.principal import Role
from cpis_bridge.core.records import today_london
from cpis_bridge.fhir import cds
from cpis_bridge.services.access import AccessService, LookupRequest
from cpis_bridge.web.common import MAX_FHIR_NESTING, allow, audit_context, json_response, loads_json, principal
from cpis_bridge.web.state import ACCESS, METRICS, REGISTRY, SETTINGS

routes = web.RouteTableDef()
CDS_HTTP: Final = web.AppKey("cds_http", aiohttp.ClientSession)
FETCH_TIMEOUT_S: Final = 5.0
MAX_PATIENT_BYTES: Final = 1024 * 1024
_KINDS: Final = {cds.PATIENT_VIEW: "cds-patient-view", cds.ENCOUNTER_START: "cds-encounter-start"}


@routes.get("/cds-services")
@allow(public=True)
async def discovery(request: web.Request) -> web.Response:
    return json_response(cds.discovery())


def _context(body: Any, service_id: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise UnreadableInput("the body must be a CDS Hooks request object")
    expected = cds.SERVICES[service_id]["hook"]
    if body.get("hook") != expected:
        raise UnreadableInput(f"hook must be {expected}")
    if not isinstance(body.get("hookInstance"), str):
        raise UnreadableInput("hookInstance is required")
    context = body.get("context")
    if not isinstance(context, dict) or not isinstance(context.get("patientId"), str) or not context["patientId"]:
        raise UnreadableInput("context.patientId is required")
    return context


async def _fetch_patient(request: web.Request, body: dict[str, Any], patient_id: str) -> Any:
    """GET {fhirServer}/Patient/{id} with the hook's fhirAuthorization; None when it cannot be fetched."""
    server = body.get("fhirServer")
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        return None
    headers = {"Accept": "application/fhir+json"}
    auth = body.get("fhirAuthorization")
    if isinstance(auth, dict) and isinstance(auth.get("access_token"), str):
        headers["Authorization"] = f"Bearer {auth['access_token']}"
    url = f"{server.rstrip('/')}/Patient/{quote(patient_id, safe='')}"
    try:
        async with request.app[CDS_HTTP].get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            raw = await resp.content.read(MAX_PATIENT_BYTES + 1)
            if len(raw) > MAX_PATIENT_BYTES:
                return None
            return orjson.loads(raw)
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ValueError):
        return None


async def _patient(request: web.Request, body: dict[str, Any], patient_id: str) -> Any:
    prefetch = body.get("prefetch")
    patient = prefetch.get("patient") if isinstance(prefetch, dict) else None
    if isinstance(patient, dict) and patient.get("resourceType") == "Patient":
        return patient
    patient = await _fetch_patient(request, body, patient_id)
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise PreconditionFailed("prefetch.patient is missing and could not be fetched from fhirServer")
    return patient


@routes.post("/cds-services/{id}")
@allow(Role.CARE_SETTING, cds=True)
async def call_service(request: web.Request) -> web.Response:
    service_id = request.match_info["id"]
    if service_id not in cds.SERVICES:
        raise NotFound("no such CDS service")
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    body = loads_json(await request.read(), limit=MAX_FHIR_NESTING)
    context = _context(body, service_id)
    patient = await _patient(request, body, context["patientId"])
    settings = request.app[SETTINGS]
    try:
        nhs = NhsNumber.parse(cds.nhs_number_of(patient), test_range_only=settings.only_test_numbers)
    except InvalidNhsNumber:
        return json_response({"cards": []})  # no usable NHS number: nothing can be flagged
    setting = request.app[REGISTRY].care_settings[principal(request).ods]
    encounter_id = context.get("encounterId") if isinstance(context.get("encounterId"), str) else None
    encounter_id = encounter_id[:100] if encounter_id else None
    if service_id == cds.ENCOUNTER_START:
        source_event_id = encounter_id
    else:  # care setting and NHS number are part of the idempotency key already; never embed the number
        source_event_id = "patient-view:" + (encounter_id or today_london().isoformat())
    req = LookupRequest(nhs=nhs, care_setting=setting, kind=_KINDS[service_id], unscheduled_claimed=True,
                        source_event_id=source_event_id)
    out = await request.app[ACCESS].lookup(audit_context(request), req)
    request.app[METRICS].accesses.labels(
        kind="unscheduled" if AccessService.is_unscheduled(req) else "silent",
        flagged="true" if out.records else "false",
    ).inc()
    return json_response(cds.cards(out.records, request.app[REGISTRY].local_authorities))


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    """The client session used to fetch a missing prefetch from the hook's fhirServer."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S, connect=2))
    app[CDS_HTTP] = session
    yield
    await session.close()


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
