"""Care-setting FHIR R4 API handlers (docs/contract.md §3, base /fhir): metadata, CareTeam / Flag / AuditEvent searches,
Encounter create and read, reads of the Organization and PractitionerRole the bundles refer to. Every access goes
through AccessService.lookup; JSON is built as dicts (no pydantic); XML, when negotiated, from those dicts."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web
from multidict import MultiMapping

from cpis_bridge import __version__
from cpis_bridge.core.errors import NotFound, UnreadableInput, UnsupportedMediaType
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.ports import LookupOutcome, LookupStatus
from cpis_bridge.core.principal import Role
from cpis_bridge.core.registry import CareSetting, LocalAuthority, office_open
from cpis_bridge.fhir import mapping as m
from cpis_bridge.fhir.capability import Interaction, SearchParam, capability_statement
from cpis_bridge.fhir.encounter import parse_encounter, retained, safe_name, with_id
from cpis_bridge.fhir.formats import CONTENT_TYPES, JSON_CT, XML_CT, parse_xml, render
from cpis_bridge.fhir.outcome import operation_outcome
from cpis_bridge.services.access import AccessService, LookupRequest
from cpis_bridge.web.common import (
    FHIR_FORMAT,
    MAX_FHIR_NESTING,
    TRACE_ID,
    Handler,
    allow,
    audit_context,
    loads_json,
    principal,
)
from cpis_bridge.web.state import METRICS, REGISTRY, SERVICES, SETTINGS

routes = web.RouteTableDef()
CAPABILITY_DATE: Final = "2026-11-22"
INTERACTION_ATTR: Final = "__fhir_interactions__"
INVALID_SEARCH: Final = "INVALID_SEARCH_DATA"
BAD_HEADER: Final = "PRECONDITION_FAILED"
# The child: FHIR's `patient` parameter with the :identifier modifier the national requests use (or the chained
# form some clients send); a bare `patient=` names a Patient resource id, which this API does not hold.
PATIENT_NAMES: Final = ("patient:identifier", "patient.identifier")
PATIENT_PARAM: Final = SearchParam(
    "patient",
    "reference",
    "Required, with the :identifier modifier: patient:identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}, the "
    "child's (or, for UCPP, the mother's) NHS number.",
)
FORMAT_PARAM: Final = SearchParam(
    "_format", "special", "json (default) or xml, or a FHIR mime type; wins over the Accept header."
)
INCLUDE_ASSIGNED: Final = f"AuditEvent:entity-type={m.ROLE_CLASS}|ASSIGNED"
# Every _include naming the accessing user's PractitionerRole (the national statement's short form among them).
AUDIT_INCLUDES: Final = (
    INCLUDE_ASSIGNED,
    "AuditEvent:agent",
    "AuditEvent:agent:PractitionerRole",
    "AuditEvent:entity",
    "AuditEvent:entity:PractitionerRole",
    "PractitionerRole",
)
# The LA Organization is always included with CareTeams; these name it and are accepted.
CARETEAM_INCLUDES: Final = ("CareTeam:participant", "CareTeam:participant:Organization", "Organization")
SEARCH_PARAMS: Final = frozenset(PATIENT_NAMES)
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


def fhir_response(
    request: web.Request, body: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """In the format negotiated for the request (JSON unless XML was asked for)."""
    fmt = request.get(FHIR_FORMAT) or "json"
    if fmt == "json":
        return web.Response(body=orjson.dumps(body), status=status, content_type=JSON_CT, headers=headers)
    return web.Response(body=render(body, fmt), status=status, content_type=CONTENT_TYPES[fmt], headers=headers)


# -- request parsing ------------------------------------------------------------------------------------------------


def search_params(
    query: MultiMapping[str], allowed: frozenset[str], includes: tuple[str, ...] = ()
) -> tuple[dict[str, str], list[str]]:
    """Strict search handling: unknown or repeated parameters are a 400 (names are echoed, never values).
    ``_include`` may repeat, each one of ``includes``; ``_format`` was honoured before the handler ran."""
    out: dict[str, str] = {}
    wanted: list[str] = []
    for name, value in query.items():
        if name == "_format":
            continue
        if name == "_include" and includes:
            if value not in includes:
                raise UnreadableInput(f"_include: supported are {', '.join(includes)}", code=INVALID_SEARCH)
            wanted.append(value)
            continue
        if name not in allowed:
            hint = " (use patient:identifier)" if name == "patient" else ""
            raise UnreadableInput(f"unknown search parameter: {safe_name(name[:40])}{hint}", code=INVALID_SEARCH)
        if name in out:
            raise UnreadableInput(f"search parameter {name} may be given only once", code=INVALID_SEARCH)
        out[name] = value
    return out, wanted


def patient_nhs(params: dict[str, str], *, test_numbers_only: bool) -> NhsNumber:
    given = [params[n] for n in PATIENT_NAMES if n in params]
    if len(given) > 1:
        raise UnreadableInput("search parameter patient:identifier may be given only once", code=INVALID_SEARCH)
    value = given[0] if given else None
    if not value:
        raise UnreadableInput("patient:identifier is required", code=INVALID_SEARCH)
    system, bar, number = value.partition("|")
    if not bar or system != m.NHS_NUMBER:
        raise UnreadableInput(f"patient:identifier must be {m.NHS_NUMBER}|<NHS number>", code=INVALID_SEARCH)
    try:
        return NhsNumber.parse(number, test_range_only=test_numbers_only)
    except InvalidNhsNumber as exc:
        raise UnreadableInput(f"patient:identifier: {exc}", code=INVALID_SEARCH) from None


UNSCHEDULED_HEADERS: Final = ("IsUnscheduledAccessEvent", "IsUnscheduledEvent")  # the second: the national alias


def unscheduled_claimed(request: web.Request) -> bool:
    claims: set[bool] = set()
    for header in UNSCHEDULED_HEADERS:
        raw = request.headers.get(header)
        if raw is None or raw.strip() == "":
            continue
        value = raw.strip().lower()
        if value not in ("true", "false"):
            raise UnreadableInput(f"{header} must be true or false", code=BAD_HEADER)
        claims.add(value == "true")
    if len(claims) > 1:
        raise UnreadableInput("IsUnscheduledAccessEvent and IsUnscheduledEvent disagree", code=BAD_HEADER)
    return claims.pop() if claims else True


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
    params, _ = search_params(request.query, SEARCH_PARAMS, CARETEAM_INCLUDES if kind == "careteam" else ())
    nhs = patient_nhs(params, test_numbers_only=request.app[SETTINGS].only_test_numbers)
    req = LookupRequest(
        nhs=nhs,
        care_setting=calling_setting(request),
        kind=kind,
        unscheduled_claimed=unscheduled_claimed(request),
        source_event_id=request.get(TRACE_ID),
    )
    out = await request.app[SERVICES].access.lookup(audit_context(request), req)
    count_access(request, unscheduled=AccessService.is_unscheduled(req), flagged=bool(out.records))
    return out


def _organization(la: LocalAuthority, office_open: bool) -> dict[str, Any]:
    """The LA's Organization, built once per registry entry and office state. Shared between responses, which only
    serialise it: never mutate it."""
    return _organization_of(la.ods, la.name, la.office_hours_phone, la.emergency_duty_phone, office_open)


@lru_cache(maxsize=1024)
def _organization_of(ods: str, name: str, office_phone: str, duty_phone: str, office_open: bool) -> dict[str, Any]:
    # what organization() reads (a LocalAuthority with a FHIR channel is not hashable)
    return m.organization(LocalAuthority(ods, name, office_phone, duty_phone), office_open)


# -- handlers -------------------------------------------------------------------------------------------------------


@routes.get("/fhir/metadata")
@allow(public=True)
@fhir()
async def metadata(request: web.Request) -> web.Response:
    body = capability_statement(
        routed_interactions(request.app), version=__version__, date=CAPABILITY_DATE, base_url=fhir_base(request)
    )
    return fhir_response(request, body)


@routes.get("/fhir/CareTeam", allow_head=False)  # a HEAD must not record an access
@allow(CS)
@fhir(
    Interaction(
        "CareTeam",
        "search-type",
        m.PROFILE_CARETEAM,
        (PATIENT_PARAM, FORMAT_PARAM),
        includes=CARETEAM_INCLUDES,
        documentation="One CareTeam per visible record; the LA Organization as search.mode=include "
        "(always, with or without _include). An unscheduled access is recorded and the LA "
        "notified.",
    )
)
async def search_careteam(request: web.Request) -> web.Response:
    out = await lookup_for_search(request, "careteam")
    las = request.app[REGISTRY].local_authorities
    today, now = request.app[SERVICES].access.today(), dt.datetime.now(dt.UTC)
    owners = {
        la: office_open(las[la].office_hours, now) for la in dict.fromkeys(r.la for r in out.records) if la in las
    }
    teams = [m.careteam(r, las.get(r.la), today=today, office_open=owners.get(r.la, False)) for r in out.records]
    orgs = [_organization(las[la], is_open) for la, is_open in owners.items()]
    return fhir_response(request, m.searchset(fhir_base(request), self_link(request), teams, orgs))


@routes.get("/fhir/Flag", allow_head=False)  # a HEAD must not record an access
@allow(CS)
@fhir(
    Interaction(
        "Flag",
        "search-type",
        m.PROFILE_FLAG,
        (PATIENT_PARAM, FORMAT_PARAM),
        supported_profiles=(m.UKCORE_FLAG,),
        documentation="One UK Core Flag per visible record; an access exactly as for CareTeam.",
    )
)
async def search_flag(request: web.Request) -> web.Response:
    out = await lookup_for_search(request, "flag")
    las = request.app[REGISTRY].local_authorities
    flags = [m.flag(r, las.get(r.la)) for r in out.records]
    return fhir_response(request, m.searchset(fhir_base(request), self_link(request), flags))


@routes.get("/fhir/AuditEvent", allow_head=False)  # a HEAD must not record an access
@allow(CS)
@fhir(
    Interaction(
        "AuditEvent",
        "search-type",
        m.PROFILE_AUDITEVENT,
        (PATIENT_PARAM, FORMAT_PARAM),
        includes=AUDIT_INCLUDES,
        documentation="The last 25 unscheduled accesses, newest first; never itself an access. Each "
        "care setting sees the TraceIDs and attendance identifiers of its own accesses "
        "only. Any of the _include values adds each accessing user's PractitionerRole.",
    )
)
async def search_auditevent(request: web.Request) -> web.Response:
    params, includes = search_params(request.query, SEARCH_PARAMS, AUDIT_INCLUDES)
    nhs = patient_nhs(params, test_numbers_only=request.app[SETTINGS].only_test_numbers)
    service = request.app[SERVICES].access
    _, accesses = await service.history(nhs, ctx=audit_context(request), kind="auditevent")
    names = request.app[REGISTRY].care_setting_names()
    viewer = principal(request).ods
    events = [m.audit_event(aid, a, nhs, names, viewer=viewer) for aid, a in accesses]
    roles: dict[str, dict[str, Any]] = {}
    for _, a in accesses:
        role = m.practitioner_role(a, names.get(a.care_setting, (None, None))[0])
        roles.setdefault(role["id"], role)
    # every AuditEvent refers to its PractitionerRole by id: kept so that the reference can be read
    await service.keep_practitioner_roles({rid: orjson.dumps(role) for rid, role in roles.items()})
    included = roles.values() if includes else ()
    return fhir_response(request, m.searchset(fhir_base(request), self_link(request), events, included))


def _resource_id(request: web.Request, kind: str) -> str:
    if request.query:
        search_params(request.query, frozenset())
    rid = request.match_info["id"]
    if not _ID.match(rid):
        raise NotFound(f"no such {kind}")
    return rid


@routes.get("/fhir/Organization/{id}", allow_head=False)
@allow(CS)
@fhir(
    Interaction(
        "Organization",
        "read",
        m.PROFILE_ORGANIZATION,
        documentation="A local authority of the registry (the one CareTeams refer to), by ODS code.",
    )
)
async def read_organization(request: web.Request) -> web.Response:
    la = request.app[REGISTRY].local_authorities.get(_resource_id(request, "Organization"))
    if la is None:
        raise NotFound("no such Organization")
    return fhir_response(request, _organization(la, office_open(la.office_hours, dt.datetime.now(dt.UTC))))


@routes.get("/fhir/PractitionerRole/{id}", allow_head=False)
@allow(CS)
@fhir(
    Interaction(
        "PractitionerRole",
        "read",
        documentation="An accessing user in their care setting, as an AuditEvent referred to it.",
    )
)
async def read_practitioner_role(request: web.Request) -> web.Response:
    role = await request.app[SERVICES].access.practitioner_role(_resource_id(request, "PractitionerRole"))
    if role is None:
        raise NotFound("no such PractitionerRole")
    return fhir_response(request, role)


@routes.post("/fhir/Encounter")
@allow(CS)
@fhir(
    Interaction(
        "Encounter",
        "create",
        m.PROFILE_ENCOUNTER,
        documentation="An attendance notification (application/fhir+json or application/fhir+xml): 201 "
        "when a record is visible (the access is recorded and the LA notified), 200 with "
        "the same Encounter on a repeat of its identifier, 200 with an informational "
        "OperationOutcome otherwise (nothing retained).",
    )
)
async def create_encounter(request: web.Request) -> web.Response:
    if request.content_type in (JSON_CT, "application/json"):
        body = loads_json(await request.read(), limit=MAX_FHIR_NESTING)
    elif request.content_type in (XML_CT, "application/xml"):
        try:
            body = parse_xml(await request.read(), "Encounter")
        except ValueError:
            raise UnreadableInput("the body is not a valid FHIR XML Encounter") from None
    else:
        raise UnsupportedMediaType("the body must be application/fhir+json or application/fhir+xml")
    settings = request.app[SETTINGS]
    inbound = parse_encounter(body, test_numbers_only=settings.only_test_numbers)
    setting = calling_setting(request)
    keep = retained(inbound.minimal, setting.ods)
    req = LookupRequest(
        nhs=inbound.nhs,
        care_setting=setting,
        kind="encounter",
        unscheduled_claimed=True,
        source_event_id=inbound.source_event_id,
        arrived_at=inbound.arrived_at,
        encounter=keep,
    )
    service = request.app[SERVICES].access
    out = await service.lookup(audit_context(request), req)
    count_access(request, unscheduled=setting.unscheduled, flagged=bool(out.records))
    if not setting.unscheduled:
        return fhir_response(
            request,
            operation_outcome(
                200,
                "This care setting is registered for scheduled care only: the attendance was not recorded and "
                "nothing was retained.",
            ),
        )
    if out.status == LookupStatus.NOT_RECORDED or out.access_id is None:
        return fhir_response(request, operation_outcome(200, "No record: nothing was retained."))
    if out.status == LookupStatus.RECORDED:
        location = f"{fhir_base(request)}/Encounter/{out.access_id}"
        return fhir_response(request, with_id(keep, out.access_id), status=201, headers={"Location": location})
    stored = await service.encounter(out.access_id)
    return fhir_response(request, with_id(stored or keep, out.access_id))


@routes.get("/fhir/Encounter/{id}", allow_head=False)
@allow(CS)
@fhir(
    Interaction(
        "Encounter",
        "read",
        m.PROFILE_ENCOUNTER,
        documentation="A retained attendance, only for the care setting that sent it.",
    )
)
async def read_encounter(request: web.Request) -> web.Response:
    encounter_id = _resource_id(request, "Encounter")
    stored = await request.app[SERVICES].access.encounter(encounter_id, ctx=audit_context(request))
    if stored is None:
        raise NotFound("no such Encounter")
    return fhir_response(request, with_id(stored, encounter_id))


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
