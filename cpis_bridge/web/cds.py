"""CDS Hooks 2.0 handlers: discovery (public), the cpis-patient-view / cpis-encounter-start services and their
feedback. They read the NHS number (and the clinician, and the arrival) from prefetch or, only at an origin registered
for the caller, from the hook's fhirServer; accesses go via AccessService, in the name of ``context.userId``."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import LONDON, today_london
from cpis_bridge.core.errors import NotFound, PreconditionFailed, UnreadableInput, UnsupportedMediaType
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.principal import Role
from cpis_bridge.core.registry import office_open, origin_of
from cpis_bridge.fhir import cds
from cpis_bridge.fhir.encounter import instant_problem
from cpis_bridge.fhir.formats import JSON_CT
from cpis_bridge.services.access import AccessService, LookupRequest
from cpis_bridge.web.common import MAX_FHIR_NESTING, allow, audit_context, json_response, loads_json, principal
from cpis_bridge.web.state import METRICS, REGISTRY, SERVICES, SETTINGS

routes = web.RouteTableDef()
CDS_HTTP: Final = web.AppKey("cds_http", aiohttp.ClientSession)
ED_LAUNCH_PATH: Final = "/ed/launch"
FETCH_TIMEOUT_S: Final = 5.0
MAX_RESOURCE_BYTES: Final = 1024 * 1024
MAX_FEEDBACK: Final = 100
OUTCOMES: Final = frozenset({"accepted", "overridden"})
_KINDS: Final = {cds.PATIENT_VIEW: "cds-patient-view", cds.ENCOUNTER_START: "cds-encounter-start"}


@routes.get("/cds-services")
@allow(public=True)
async def discovery(request: web.Request) -> web.Response:
    return json_response(cds.discovery())


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    return loads_json(await request.read(), limit=MAX_FHIR_NESTING)


def _service(request: web.Request) -> str:
    service_id = request.match_info["id"]
    if service_id not in cds.SERVICES:
        raise NotFound("no such CDS service")
    return service_id


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
    user_id = context.get("userId")
    if user_id is not None and not (isinstance(user_id, str) and cds.USER_ID.fullmatch(user_id)):
        raise UnreadableInput("context.userId must be a reference such as PractitionerRole/{id}")
    return context


def _fhir_server(request: web.Request, body: dict[str, Any]) -> str | None:
    """The hook's fhirServer, only when its origin is registered for the caller (the CDS client, or for a dev
    care-setting token the care setting): the access token in fhirAuthorization is never sent anywhere else."""
    server = body.get("fhirServer")
    if not isinstance(server, str) or "?" in server or "#" in server:
        return None
    origin = origin_of(server)
    if origin is None:
        return None
    p = principal(request)
    registry = request.app[REGISTRY]
    client = registry.cds_clients.get(p.client) if p.client else None
    allowed = client.fhir_servers if client is not None else registry.care_settings[p.ods].fhir_servers
    return server.rstrip("/") if origin in allowed else None


async def _fetch(request: web.Request, body: dict[str, Any], server: str | None, path: str) -> Any:
    """GET {fhirServer}/{path} with the hook's fhirAuthorization; None when it cannot be fetched."""
    if server is None:
        return None
    headers = {"Accept": JSON_CT}
    auth = body.get("fhirAuthorization")
    if isinstance(auth, dict) and isinstance(auth.get("access_token"), str):
        headers["Authorization"] = f"Bearer {auth['access_token']}"
    try:
        async with request.app[CDS_HTTP].get(f"{server}/{path}", headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            raw = await resp.content.read(MAX_RESOURCE_BYTES + 1)
            if len(raw) > MAX_RESOURCE_BYTES:
                return None
            return orjson.loads(raw)
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ValueError):
        return None


def _prefetched(body: dict[str, Any], *names: str) -> Any:
    prefetch = body.get("prefetch")
    if not isinstance(prefetch, dict):
        return None
    return next((prefetch[n] for n in names if isinstance(prefetch.get(n), dict)), None)


async def _patient(request: web.Request, body: dict[str, Any], server: str | None, patient_id: str) -> Any:
    patient = _prefetched(body, "patient")
    if isinstance(patient, dict) and patient.get("resourceType") == "Patient":
        return patient
    patient = await _fetch(request, body, server, f"Patient/{quote(patient_id, safe='')}")
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise PreconditionFailed("prefetch.patient is missing and could not be fetched from fhirServer")
    return patient


async def _user(request: web.Request, body: dict[str, Any], server: str | None, user_id: str | None) -> cds.User | None:
    """The clinician the call names: from the user prefetch, else from fhirServer; None without a userId."""
    if user_id is None:
        return None
    resource = _prefetched(body, "user", "practitionerRole", "practitioner")
    if resource is None or resource.get("resourceType") != user_id.partition("/")[0]:
        resource = await _fetch(request, body, server, user_id)
    return cds.user_from(user_id, resource)


def _arrival(body: dict[str, Any]) -> dt.datetime | None:
    """The prefetched Encounter's period.start, if any; more than 5 minutes ahead is refused."""
    encounter = _prefetched(body, "encounter")
    period = encounter.get("period") if encounter is not None else None
    start = period.get("start") if isinstance(period, dict) else None
    if not isinstance(start, str):
        return None
    try:
        arrived = dt.datetime.fromisoformat(start)
    except ValueError:
        raise UnreadableInput("prefetch.encounter.period.start is not a FHIR dateTime") from None
    if arrived.tzinfo is None:
        arrived = arrived.replace(tzinfo=LONDON)
    problem = instant_problem(arrived)
    if problem is not None:
        raise UnreadableInput(f"prefetch.encounter.period.start {problem}")
    return arrived


def _acting(request: web.Request, user: cds.User | None) -> AuditContext:
    """The audit context in the clinician's name; the calling system (the token's subject) is kept as ``via``."""
    ctx = audit_context(request)
    if user is None or user.id == ctx.principal.subject:
        return ctx
    person = dataclasses.replace(ctx.principal, subject=user.id, name=user.name, role_code=user.role_code)
    return dataclasses.replace(ctx, principal=person, via=ctx.principal.subject)


@routes.post("/cds-services/{id}")
@allow(Role.CARE_SETTING, cds=True)
async def call_service(request: web.Request) -> web.Response:
    service_id = _service(request)
    body = await _json_body(request)
    context = _context(body, service_id)
    arrived = _arrival(body) if service_id == cds.ENCOUNTER_START else None
    server = _fhir_server(request, body)
    patient, user = await asyncio.gather(
        _patient(request, body, server, context["patientId"]), _user(request, body, server, context.get("userId"))
    )
    settings = request.app[SETTINGS]
    try:
        nhs = NhsNumber.parse(cds.nhs_number_of(patient), test_range_only=settings.only_test_numbers)
    except InvalidNhsNumber:
        return json_response({"cards": []})  # no usable NHS number: nothing can be flagged
    registry = request.app[REGISTRY]
    setting = registry.care_settings[principal(request).ods]
    encounter_id = context.get("encounterId") if isinstance(context.get("encounterId"), str) else None
    encounter_id = encounter_id[:100] if encounter_id else None
    if service_id == cds.ENCOUNTER_START:
        source_event_id = encounter_id
    else:  # care setting and NHS number are part of the idempotency key already; never embed the number
        source_event_id = "patient-view:" + (encounter_id or today_london().isoformat())
    req = LookupRequest(
        nhs=nhs,
        care_setting=setting,
        kind=_KINDS[service_id],
        unscheduled_claimed=True,
        source_event_id=source_event_id,
        arrived_at=arrived,
        recent=True,
    )
    access = request.app[SERVICES].access
    out = await access.lookup(_acting(request, user), req)
    request.app[METRICS].accesses.labels(
        kind="unscheduled" if AccessService.is_unscheduled(req) else "silent",
        flagged="true" if out.records else "false",
    ).inc()
    las = registry.local_authorities
    now = dt.datetime.now(dt.UTC)
    open_now = {r.la: office_open(las[r.la].office_hours, now) for r in out.records if r.la in las}
    names = {ods: cs.name for ods, cs in registry.care_settings.items()}
    link = None
    if out.records and setting.smart is not None:
        link = await _smart_link(request, nhs, setting.ods, context["patientId"], user)
    return json_response(
        cds.cards(
            out.records,
            las,
            today=access.today(),
            open_now=open_now,
            recent=out.recent,
            care_settings=names,
            link=link,
        )
    )


async def _smart_link(
    request: web.Request, nhs: NhsNumber, ods: str, patient_id: str, user: cds.User | None
) -> dict[str, str]:
    """The cards' SMART link to the clinician view, its appContext an opaque id for this look-up's context."""
    p = principal(request)
    who = user or cds.User(p.subject, p.name, p.role_code)
    context = {
        "nhs": str(nhs),
        "cs": ods,
        "patient": patient_id[:200],
        "user": {"id": who.id, "name": who.name, "roleCode": who.role_code},
    }
    app_context = await request.app[SERVICES].launches.mint(context)
    return cds.smart_link(request.app[SETTINGS].base_url + ED_LAUNCH_PATH, app_context)


def _feedback_entry(item: Any, index: int) -> dict[str, Any]:
    """One feedback item reduced to codes: the card, the outcome, when, and the override reason's code (no free
    text, such as a user comment, is kept)."""
    where = f"feedback[{index}]"
    if not isinstance(item, dict):
        raise UnreadableInput(f"{where} must be an object")
    card_id, outcome, at = item.get("card"), item.get("outcome"), item.get("outcomeTimestamp")
    if not isinstance(card_id, str) or not 0 < len(card_id) <= 64:
        raise UnreadableInput(f"{where}.card must be the card's uuid")
    if outcome not in OUTCOMES:
        raise UnreadableInput(f"{where}.outcome must be accepted or overridden")
    if not isinstance(at, str):
        raise UnreadableInput(f"{where}.outcomeTimestamp is required")
    try:
        when = dt.datetime.fromisoformat(at)
    except ValueError:
        raise UnreadableInput(f"{where}.outcomeTimestamp must be an instant") from None
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    problem = instant_problem(when)
    if problem is not None:
        raise UnreadableInput(f"{where}.outcomeTimestamp {problem}")
    entry: dict[str, Any] = {
        "card": card_id,
        "outcome": outcome,
        "outcomeTimestamp": (when if when.tzinfo else when.replace(tzinfo=dt.UTC))
        .astimezone(dt.UTC)
        .isoformat()
        .replace("+00:00", "Z"),
    }
    reason = item.get("overrideReason")
    coding = reason.get("reason") if isinstance(reason, dict) else None
    if isinstance(coding, dict) and isinstance(coding.get("code"), str):
        system = coding.get("system")
        system = system if isinstance(system, str) else ""
        entry["overrideReason"] = f"{system[:200]}|{coding['code'][:64]}"
    suggestions = item.get("acceptedSuggestions")
    if isinstance(suggestions, list):
        entry["acceptedSuggestions"] = len(suggestions)
    return entry


@routes.post("/cds-services/{id}/feedback")
@allow(Role.CARE_SETTING, cds=True)
async def feedback(request: web.Request) -> web.Response:
    """CDS Hooks 2.0 feedback on our cards: audited (as codes), nothing else changes."""
    service_id = _service(request)
    body = await _json_body(request)
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 0 < len(items) <= MAX_FEEDBACK:
        raise UnreadableInput(f"feedback must be a list of 1 to {MAX_FEEDBACK} items")
    entries = [_feedback_entry(item, i) for i, item in enumerate(items)]
    ctx = audit_context(request)
    await request.app[SERVICES].audit.append(
        None, ctx.entry("cds.feedback", None, dt.datetime.now(dt.UTC), service=service_id, feedback=entries)
    )
    return web.Response(status=200)


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    """The client session used to fetch a missing prefetch from the hook's fhirServer."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S, connect=2))
    app[CDS_HTTP] = session
    yield
    await session.close()


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
