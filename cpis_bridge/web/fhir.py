"""Care-setting FHIR R4 API handlers (API.md section 3, base /fhir): metadata, CareTeam / Flag / AuditEvent searches,
Encounter create and read. Every access goes through AccessService.lookup; JSON is built as dicts (no pydantic)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web
from multidict import MultiMapping

from cpis_bridge import __version__
from cpis_bridge.core.errors import NotFound, UnreadableInput, UnsupportedMediaType
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.ports import LookupOutcome
from cpis_bridge.core.principal import Role
from cpis_bridge.core.registry import CareSetting, LocalAuthority, office_open
from cpis_bridge.fhir import mapping as m
from cpis_bridge.fhir.capability import Interaction, SearchParam, capability_statement
from cpis_bridge.fhir.encounter import parse_encounter, retained, safe_name, with_id
from cpis_bridge.fhir.outcome import operation_outcome
from cpis_bridge.services.access import AccessService, LookupRequest
from cpis_bridge.web.common import MAX_FHIR_NESTING, TRACE_ID, Handler, allow, audit_context, loads_json, principal
from cpis_bridge.web.state import ACCESS, METRICS, REGISTRY, SETTINGS

routes = web.RouteTableDef()
FHIR_CT: Final = "application/fhir+json"
JSON_FORMATS: Final = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
CAPABILITY_DATE: Final = "2026-11-22"
INTERACTION_ATTR: Final = "__fhir_interactions__"
PATIENT_PARAM: Final = SearchParam(
    "patient:identifier", "token",
    "Required. The child's (or, for UCPP, the mother's) NHS number: https://fhir.nhs.uk/Id/nhs-number|{nhs}",
)
INCLUDE_ASSIGNED: Final = f"AuditEvent:entity-type={m.ROLE_CLASS}|ASSIGNED"
INCLUDE_AGENT: Final = "AuditEvent:agent"
SEARCH_PARAMS: Final = frozenset({"patient:identifier"})
AUDIT_PARAMS: Final = frozenset({"patient:identifier", "_include"})
_ID: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
CS = Role.CARE_SETTING
H = TypeVar("H", bound=Handler)


def fhir(*interactions: Interaction) -> Callable[[H], H]:
    """Declare the FHIR interactions a route serves; /fhir/metadata is built from the routed handlers' declarations."""

    def mark(handler: H) -> H:
        setattr(handler, INTERACTION_ATTR, interactions)
        return handler

    return mark


def routed_interactions(app: web.Application) -> list[Interaction]:
    out: list[Interaction] = []
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None and route.resource.canonical.startswith("/fhir/"):
            out.extend(getattr(route.handler, INTERACTION_ATTR, ()))
    return out


def fhir_response(body: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=FHIR_CT, headers=headers)


# -- request parsing ------------------------------------------------------------------------------------------------


def search_params(query: MultiMapping[str], allowed: frozenset[str]) -> dict[str, str]:
    """Strict search handling: unknown or repeated parameters are a 400 (names are echoed, never values)."""
    out: dict[str, str] = {}
    for name, value in query.items():
        if name == "_format":
            if value not in JSON_FORMATS:
                raise UnreadableInput("_format: only JSON is supported")
            continue
        if name not in allowed:
            raise UnreadableInput(f"unknown search parameter: {safe_name(name[:40])}")
        if name in out:
            raise UnreadableInput(f"search parameter {name} may be given only once")
        out[name] = value
    return out


def patient_nhs(params: dict[str, str], *, test_numbers_only: bool) -> NhsNumber:
    value = params.get("patient:identifier")
    if not value:
        raise UnreadableInput("patient:identifier is required")
    system, bar, number = value.partition("|")
    if not bar or system != m.NHS_NUMBER:
        raise UnreadableInput(f"patient:identifier must be {m.NHS_NUMBER}|<NHS number>")
    try:
        return NhsNumber.parse(number, test_range_only=test_numbers_only)
    except InvalidNhsNumber as exc:
        raise UnreadableInput(f"patient:identifier: {exc}") from None


def unscheduled_claimed(request: web.Request) -> bool:
    raw = request.headers.get("IsUnscheduledAccessEvent")
    if raw is None or raw.strip() == "":
        return True
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise UnreadableInput("IsUnscheduledAccessEvent must be true or false")
    return value == "true"


def calling_setting(request: web.Request) -> CareSetting:
    return request.app[REGISTRY].care_settings[principal(request).ods]


def count_access(request: web.Request, *, unscheduled: bool, flagged: bool) -> None:
    request.app[METRICS].count_access(unscheduled=unscheduled, flagged=flagged)


def fhir_base(request: web.Request) -> str:
    return request.app[SETTINGS].base_url + "/fhir"


def self_link(request: web.Request) -> str:
    return request.app[SETTINGS].base_url + str(request.rel_url)


async def lookup_for_search(request: web.Request, kind: str) -> LookupOutcome:
    """CareTeam and Flag searches: the same access rule (an ED must not see the alert without the LA hearing)."""
    params = search_params(request.query, SEARCH_PARAMS)
    nhs = patient_nhs(params, test_numbers_only=request.app[SETTINGS].only_test_numbers)
    req = LookupRequest(nhs=nhs, care_setting=calling_setting(request), kind=kind,
                        unscheduled_claimed=unscheduled_claimed(request), source_event_id=request.get(TRACE_ID))
    out = await request.app[ACCESS].lookup(audit_context(request), req)
    count_access(request, unscheduled=AccessService.is_unscheduled(req), flagged=bool(out.records))
    return out


_ORGS: dict[tuple[str, str, str, str, bool], dict[str, Any]] = {}


def _organization(la: LocalAuthority, office_open: bool) -> dict[str, Any]:
    """The LA's Organization, built once per registry entry and office state (orjson only reads it)."""
    key = (la.ods, la.name, la.office_hours_phone, la.emergency_duty_phone, office_open)  # what organization() reads
    org = _ORGS.get(key)
    if org is None:
        if len(_ORGS) > 1024:
            _ORGS.clear()
        org = _ORGS[key] = m.organization(la, office_open)
    return org


# -- handlers -------------------------------------------------------------------------------------------------------


@routes.get("/fhir/metadata")
@allow(public=True)
@fhir()
async def metadata(request: web.Request) -> web.Response:
    body = capability_statement(routed_interactions(request.app), version=__version__, date=CAPABILITY_DATE,
                                base_url=fhir_base(request))
    return fhir_response(body)


@routes.get("/fhir/CareTeam", allow_head=False)  # a HEAD must not record an access
@allow(CS)
@fhir(Interaction("CareTeam", "search-type", m.PROFILE_CARETEAM, (PATIENT_PARAM,),
                  documentation="One CareTeam per visible record; the LA Organization as search.mode=include. "
                                "An unscheduled access is recorded and the LA notified."))
async def search_careteam(request: web.Request) -> web.Response:
    out = await lookup_for_search(request, "careteam")
    las = request.app[REGISTRY].local_authorities
    today, now = request.app[ACCESS].today(), dt.datetime.now(dt.UTC)
    owners = {la: office_open(las[la].office_hours, now) for la in dict.fromkeys(r.la for r in out.records)
              if la in las}
    teams = [m.careteam(r, las.get(r.la), today=today, office_open=owners.get(r.la, False)) for r in out.records]
    orgs = [_organization(las[la], is_open) for la, is_open in owners.items()]
    return fhir_response(m.searchset(fhir_base(request), self_link(request), teams, orgs))


@routes.get("/fhir/Flag", allow_head=False)  # a HEAD must not record an access
@allow(CS)
@fhir(Interaction("Flag", "search-type", m.PROFILE_FLAG, (PATIENT_PARAM,), supported_profiles=(m.UKCORE_FLAG,),
                  documentation="One UK Core Flag per visible record; an access exactly as for CareTeam."))
async def search_flag(request: web.Request) -> web.Response:
    out = await lookup_for_search(request, "flag")
    las = request.app[REGISTRY].local_authorities
    flags = [m.flag(r, las.get(r.la)) for r in out.records]
    return fhir_response(m.searchset(fhir_base(request), self_link(request), flags))


@routes.get("/fhir/AuditEvent", allow_head=False)  # a HEAD must not record an access
@allow(CS)
@fhir(Interaction("AuditEvent", "search-type", m.PROFILE_AUDITEVENT,
                  (PATIENT_PARAM, SearchParam("_include", "special", f"{INCLUDE_ASSIGNED} (or {INCLUDE_AGENT}): "
                                                                      "include each accessing user's "
                                                                      "PractitionerRole")),
                  includes=(INCLUDE_AGENT, INCLUDE_ASSIGNED),
                  documentation="The last 25 unscheduled accesses, newest first; never itself an access."))
async def search_auditevent(request: web.Request) -> web.Response:
    params = search_params(request.query, AUDIT_PARAMS)
    include = params.get("_include")
    if include is not None and include not in (INCLUDE_ASSIGNED, INCLUDE_AGENT):
        raise UnreadableInput(f"_include: only {INCLUDE_ASSIGNED} is supported")
    nhs = patient_nhs(params, test_numbers_only=request.app[SETTINGS].only_test_numbers)
    _, accesses = await request.app[ACCESS].history(nhs, ctx=audit_context(request), kind="auditevent")
    names = request.app[REGISTRY].care_setting_names()
    events = [m.audit_event(aid, a, nhs, names) for aid, a in accesses]
    roles: dict[str, dict[str, Any]] = {}
    if include is not None:
        for _, a in accesses:
            role = m.practitioner_role(a, names.get(a.care_setting, (None, None))[0])
            roles.setdefault(role["id"], role)
    return fhir_response(m.searchset(fhir_base(request), self_link(request), events, roles.values()))


@routes.post("/fhir/Encounter")
@allow(CS)
@fhir(Interaction("Encounter", "create", m.PROFILE_ENCOUNTER,
                  documentation="An attendance notification: 201 when a record is visible (the access is recorded "
                                "and the LA notified), 200 with the same Encounter on a repeat of its identifier, "
                                "200 with an informational OperationOutcome otherwise (nothing retained)."))
async def create_encounter(request: web.Request) -> web.Response:
    if request.content_type not in (FHIR_CT, "application/json"):
        raise UnsupportedMediaType("the body must be application/fhir+json")
    body = loads_json(await request.read(), limit=MAX_FHIR_NESTING)
    settings = request.app[SETTINGS]
    inbound = parse_encounter(body, test_numbers_only=settings.only_test_numbers)
    setting = calling_setting(request)
    keep = retained(inbound.minimal, setting.ods)
    req = LookupRequest(nhs=inbound.nhs, care_setting=setting, kind="encounter", unscheduled_claimed=True,
                        source_event_id=inbound.source_event_id, arrived_at=inbound.arrived_at, encounter=keep)
    service = request.app[ACCESS]
    out = await service.lookup(audit_context(request), req)
    count_access(request, unscheduled=setting.unscheduled, flagged=bool(out.records))
    if not setting.unscheduled:
        return fhir_response(operation_outcome(
            200, "This care setting is registered for scheduled care only: the attendance was not recorded and "
                 "nothing was retained."))
    if out.status == 0 or out.access_id is None:
        return fhir_response(operation_outcome(200, "No record: nothing was retained."))
    if out.status == 1:
        location = f"{fhir_base(request)}/Encounter/{out.access_id}"
        return fhir_response(with_id(keep, out.access_id), status=201, headers={"Location": location})
    stored = await service.encounter(out.access_id)
    return fhir_response(with_id(stored or keep, out.access_id))


@routes.get("/fhir/Encounter/{id}", allow_head=False)
@allow(CS)
@fhir(Interaction("Encounter", "read", m.PROFILE_ENCOUNTER,
                  documentation="A retained attendance, only for the care setting that sent it."))
async def read_encounter(request: web.Request) -> web.Response:
    encounter_id = request.match_info["id"]
    if request.query:
        search_params(request.query, frozenset())
    if not _ID.match(encounter_id):
        raise NotFound("no such Encounter")
    stored = await request.app[ACCESS].encounter(encounter_id, ctx=audit_context(request))
    if stored is None:
        raise NotFound("no such Encounter")
    return fhir_response(with_id(stored, encounter_id))


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
