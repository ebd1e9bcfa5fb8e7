"""The clinician view under /ed/ (NHS.UK frontend): opened from a CDS card's SMART link (SMART App Launch, EHR
launch, with the card's opaque appContext) or, after a care-setting sign-in (the dev sign-in page in dev mode), with
an NHS number posted in a form. Opening a child's page is an access through AccessService.lookup, exactly as a
FHIR look-up (audit, LA notification); the page shows the plans, the LA, the number to ring now and the child's
recent unscheduled visits."""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import secrets
import ssl
import time
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import aiohttp_jinja2
import httpx2
import jinja2
from aiohttp import web
from aiohttp_session import SESSION_KEY, Session, get_session, new_session
from authlib.common.security import generate_token

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import utc_now
from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.core.records import Record
from cpis_bridge.core.registry import CareSetting, office_open, origin_of
from cpis_bridge.fhir.cds import plain_date, plain_instant
from cpis_bridge.fhir.mapping import EMERGENCY_DUTY, OFFICE_HOURS, PLAN_NAMES, plan_running
from cpis_bridge.services.access import AccessService, LookupRequest
from cpis_bridge.web.common import PRINCIPAL, REQUEST_ID, Handler, allow
from cpis_bridge.web.state import METRICS, REGISTRY, SERVICES, SETTINGS
from cpis_bridge.web.views.pages import (
    CSP,
    HERE,
    SIGNED_IN,
    STATIC,
    ViewHandler,
    assets_handler,
    checked_form,
    csrf_token,
    make_subapp,
)

if TYPE_CHECKING:
    from authlib.integrations.httpx_client import AsyncOAuth2Client

CS: Final = Role.CARE_SETTING
PREFIX: Final = "/ed"
SIGN_IN: Final = f"{PREFIX}/sign-in"
CALLBACK: Final = f"{PREFIX}/callback"
COOKIE: Final = "__Host-cpis-ed"
SCOPE: Final = "launch openid fhirUser"
LAUNCH_MAX_AGE_S: Final = 600  # between our redirect to the EHR and its redirect back
HTTP_TIMEOUT_S: Final = 5.0
MAX_CONFIG_BYTES: Final = 64 * 1024
CONFIG_KEEP_S: Final = 300.0  # an EHR's SMART configuration is read again after this long
KEEP_CHILDREN: Final = 10  # children a session can show again (newest kept)
HTTP = web.AppKey("ed_http", httpx2.AsyncClient)
TLS = web.AppKey("ed_tls", ssl.SSLContext)
CONFIGS = web.AppKey("ed_smart_configs", dict[str, tuple[float, dict[str, str]]])

routes = web.RouteTableDef()
log = logging.getLogger(__name__)


class LaunchFailed(Exception):
    """A SMART launch that cannot go on; ``reason`` is a short code for the audit (never input echoed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- the signed-in clinician ---------------------------------------------------------------------------------------
def clinician(session: Session) -> Principal | None:
    who = session.get(SIGNED_IN)
    if not isinstance(who, dict) or who.get("role") != CS.value:
        return None
    return Principal(
        subject=str(who["sub"]),
        role=CS,
        ods=str(who["ods"]),
        name=who.get("name") or None,
        role_code=who.get("roleCode") or None,
    )


def page(view: ViewHandler) -> Handler:
    """A page for a signed-in clinician (others go to the sign-in page); every request renews the idle timeout."""

    @allow(public=True)
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        who = clinician(session)
        if who is None or who.ods not in request.config_dict[REGISTRY].care_settings:
            raise web.HTTPSeeOther(SIGN_IN)
        request[PRINCIPAL] = who
        session.changed()
        return await view(request, session)

    handler.__name__ = view.__name__
    handler.__doc__ = view.__doc__
    return handler


def _ctx(request: web.Request, who: Principal) -> AuditContext:
    return AuditContext(who, None, request.get(REQUEST_ID))


def _system_ctx(request: web.Request, ods: str = "-") -> AuditContext:
    return AuditContext(Principal(subject="-", role=CS, ods=ods), None, request.get(REQUEST_ID))


def _now() -> dt.datetime:
    return utc_now()


def render(
    request: web.Request, template: str, context: dict[str, Any], session: Session | None = None, status: int = 200
) -> web.Response:
    ctx = dict(context)
    if session is not None:
        ctx.setdefault("csrf", csrf_token(session))
        ctx.setdefault("who", clinician(session))
        if ctx["who"] is not None:
            place = request.config_dict[REGISTRY].care_settings.get(ctx["who"].ods)
            ctx.setdefault("place", place.name if place is not None else None)
    return aiohttp_jinja2.render_template(template, request, ctx, status=status)


def frame_ancestors(request: web.Request) -> str:
    """'none', or the EHR origins registered for the signed-in clinician's care setting (SMART launch in a frame)."""
    session = request.get(SESSION_KEY)
    who = clinician(session) if session is not None else None
    setting = request.config_dict[REGISTRY].care_settings.get(who.ods) if who is not None else None
    if setting is None or setting.smart is None or not setting.smart.frame_origins:
        return "'none'"
    return " ".join(setting.smart.frame_origins)


@web.middleware
async def framing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The view's CSP, with frame-ancestors for the signed-in clinician's EHR (the outer middleware keeps it)."""
    response = await handler(request)
    if not response.prepared:
        response.headers["Content-Security-Policy"] = CSP.format(ancestors=frame_ancestors(request))
    return response


# -- failures: rate limited and audited ----------------------------------------------------------------------------
def _count(request: web.Request, method: str, outcome: str, reason: str = "-") -> None:
    """cpis_web_signins_total, with the duty view's: methods ``smart`` (a launch) and ``ed-dev`` (dev sign-in)."""
    request.config_dict[METRICS].web_signins.labels(method, outcome, reason).inc()


async def _refused_if_blocked(request: web.Request, ods: str = "-", method: str = "smart") -> web.Response | None:
    if await request.config_dict[SERVICES].ed_signin.blocked(request.remote or "-"):
        _count(request, method, "refused", "rate-limited")
        await request.config_dict[SERVICES].audit.append(
            None, _system_ctx(request, ods).entry("web.ed.signin.refused", None, _now())
        )
        return render(request, "error.html", {"heading": "Too many attempts", "status": 429}, status=429)
    return None


async def _launch_failed(request: web.Request, reason: str, ods: str = "-") -> web.Response:
    await request.config_dict[SERVICES].ed_signin.failed(request.remote or "-")
    await request.config_dict[SERVICES].audit.append(
        None, _system_ctx(request, ods).entry("web.ed.launch.failed", None, _now(), reason=reason)
    )
    _count(request, "smart", "failed", reason)
    log.warning("clinician view launch refused", extra={"reason": reason})
    return render(request, "error.html", {"heading": "The CP-IS view could not be opened", "status": 400}, status=400)


# -- SMART App Launch (EHR launch) ---------------------------------------------------------------------------------
async def _smart_configuration(request: web.Request, iss: str) -> dict[str, str]:
    """The EHR's endpoints from ``{iss}/.well-known/smart-configuration``; PKCE S256 must be supported. A usable
    configuration is kept for CONFIG_KEEP_S (launches do not each cost the EHR a request); a failure is not kept."""
    kept = request.app[CONFIGS].get(iss)
    if kept is not None and kept[0] > time.monotonic():
        return kept[1]
    endpoints = await _read_configuration(request, iss)
    request.app[CONFIGS][iss] = (time.monotonic() + CONFIG_KEEP_S, endpoints)
    return endpoints


async def _read_configuration(request: web.Request, iss: str) -> dict[str, str]:
    try:
        resp = await request.app[HTTP].get(
            f"{iss}/.well-known/smart-configuration", headers={"Accept": "application/json"}
        )
    except httpx2.HTTPError:
        raise LaunchFailed("configuration-unreachable") from None
    if resp.status_code != 200 or len(resp.content) > MAX_CONFIG_BYTES:
        raise LaunchFailed("configuration-unavailable")
    try:
        config = resp.json()
    except ValueError:
        raise LaunchFailed("configuration-unreadable") from None
    if not isinstance(config, dict):
        raise LaunchFailed("configuration-unreadable")
    endpoints = {k: config.get(k) for k in ("authorization_endpoint", "token_endpoint")}
    for value in endpoints.values():
        if not isinstance(value, str) or origin_of(value) is None or "#" in value:
            raise LaunchFailed("configuration-endpoints")
    methods = config.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        raise LaunchFailed("pkce-unsupported")
    return {k: str(v) for k, v in endpoints.items()}


def _client(request: web.Request, client_id: str) -> AsyncOAuth2Client:
    # imported on first use: authlib's client package (OAuth 1 included) is most of a second of start-up otherwise
    from authlib.integrations.httpx_client import AsyncOAuth2Client

    settings = request.config_dict[SETTINGS]
    return AsyncOAuth2Client(
        client_id=client_id,
        scope=SCOPE,
        redirect_uri=settings.base_url + CALLBACK,
        code_challenge_method="S256",
        token_endpoint_auth_method="none",  # a public client: PKCE binds the code to this launch
        timeout=HTTP_TIMEOUT_S,
        follow_redirects=False,
        verify=request.app[TLS],  # one TLS context: building one per client is ~250 ms of CPU on a loaded machine
    )


@routes.get("/launch", allow_head=False)  # a HEAD must not start a launch (nor count as a failure)
@allow(public=True)
async def launch(request: web.Request) -> web.StreamResponse:
    """The EHR opens ``/ed/launch?iss=...&launch=...``: the iss must be registered for SMART launch by a care
    setting; we redirect to its authorize endpoint with the launch, aud=iss, a new state and a PKCE S256 challenge."""
    blocked = await _refused_if_blocked(request)
    if blocked is not None:
        return blocked
    iss = (request.query.get("iss") or "").rstrip("/")
    launch_id = request.query.get("launch") or ""
    if not iss or not launch_id or len(iss) > 500 or len(launch_id) > 500:
        return await _launch_failed(request, "missing-parameters")
    settings_for = request.config_dict[REGISTRY].smart_settings(iss)
    if not settings_for:
        return await _launch_failed(request, "issuer-not-registered")
    try:
        endpoints = await _smart_configuration(request, iss)
    except LaunchFailed as exc:
        return await _launch_failed(request, exc.reason, settings_for[0].ods)
    assert settings_for[0].smart is not None
    client_id = settings_for[0].smart.client_id
    state, verifier = generate_token(32), generate_token(64)
    async with _client(request, client_id) as client:
        url, _ = client.create_authorization_url(
            endpoints["authorization_endpoint"], state=state, code_verifier=verifier, launch=launch_id, aud=iss
        )
    session = await new_session(request)  # a launch starts a new session: nothing from before carries over
    session["launch"] = {
        "state": state,
        "verifier": verifier,
        "iss": iss,
        "token": endpoints["token_endpoint"],
        "client": client_id,
        "at": time.time(),
    }
    raise web.HTTPSeeOther(url)


@routes.get("/callback", allow_head=False)
@allow(public=True)
async def callback(request: web.Request) -> web.StreamResponse:
    """The EHR's redirect back: the state must be this browser's pending launch; the code is exchanged (with the
    PKCE verifier) for a token whose appContext names a context we minted for a care setting registered for the
    iss; the child's page is then opened as an access."""
    blocked = await _refused_if_blocked(request)
    if blocked is not None:
        return blocked
    session = await get_session(request)
    pending = session.pop("launch", None)
    state = request.query.get("state") or ""
    if not isinstance(pending, dict) or not state or not hmac.compare_digest(state, str(pending.get("state"))):
        return await _launch_failed(request, "state-mismatch")
    if time.time() - float(pending.get("at", 0)) > LAUNCH_MAX_AGE_S:
        return await _launch_failed(request, "launch-expired")
    if "error" in request.query:
        return await _launch_failed(request, "authorization-refused")
    code = request.query.get("code") or ""
    if not code or len(code) > 2000:
        return await _launch_failed(request, "missing-code")
    from authlib.integrations.base_client.errors import OAuthError

    try:
        async with _client(request, pending["client"]) as client:
            token = await client.fetch_token(
                pending["token"], grant_type="authorization_code", code=code, code_verifier=pending["verifier"]
            )
    except (OAuthError, httpx2.HTTPError, ValueError):
        return await _launch_failed(request, "token-refused")
    app_context = token.get("appContext")
    context = await request.config_dict[SERVICES].launches.take(app_context) if isinstance(app_context, str) else None
    if context is None:
        return await _launch_failed(request, "unknown-app-context")
    registry = request.config_dict[REGISTRY]
    allowed = {s.ods for s in registry.smart_settings(pending["iss"])}
    if context.get("cs") not in allowed:
        return await _launch_failed(request, "care-setting-mismatch")
    patient = token.get("patient")
    if patient is not None and context.get("patient") and patient != context["patient"]:
        return await _launch_failed(request, "patient-mismatch", context["cs"])
    user = context.get("user") or {}
    who = {
        "role": CS.value,
        "ods": context["cs"],
        "sub": str(user.get("id") or "-")[:100],
        "name": user.get("name"),
        "roleCode": user.get("roleCode"),
        "via": "smart",
    }
    session[SIGNED_IN] = who
    csrf_token(session)
    principal = clinician(session)
    assert principal is not None
    await request.config_dict[SERVICES].audit.append(
        None, _ctx(request, principal).entry("web.signin", None, _now(), method="smart")
    )
    _count(request, "smart", "signed-in")
    setting = registry.care_settings[context["cs"]]
    view_id = await _open(request, session, principal, setting, NhsNumber(context["nhs"]))
    raise web.HTTPSeeOther(f"{PREFIX}/children/{view_id}")


# -- opening a child's page: an access ------------------------------------------------------------------------------
async def _open(request: web.Request, session: Session, who: Principal, setting: CareSetting, nhs: NhsNumber) -> str:
    """The access (AccessService.lookup, as the FHIR look-up: audit and LA notification) and an opaque id for
    the child's page in this session (the NHS number stays in the session, never in the URL)."""
    req = LookupRequest(
        nhs=nhs, care_setting=setting, kind="ed-view", source_event_id="ed-view:" + secrets.token_urlsafe(12)
    )
    out = await request.config_dict[SERVICES].access.lookup(_ctx(request, who), req)
    request.config_dict[METRICS].count_access(unscheduled=AccessService.is_unscheduled(req), flagged=bool(out.records))
    view_id = secrets.token_urlsafe(16)
    children = dict(session.get("children") or {})
    children[view_id] = str(nhs)
    session["children"] = dict(list(children.items())[-KEEP_CHILDREN:])
    return view_id


def _plans(request: web.Request, records: list[Record], today: dt.date) -> list[dict[str, Any]]:
    las = request.config_dict[REGISTRY].local_authorities
    now = _now()
    out = []
    for r in records:
        la = las.get(r.la)
        running = plan_running(r, today)
        item: dict[str, Any] = {
            "plan": PLAN_NAMES[r.plan_type],
            "running": running,
            "start": plain_date(r.start_date),
            "end": plain_date(r.end_date) if r.end_date else None,
            "edd": plain_date(r.expected_delivery_date) if r.expected_delivery_date else None,
            "la": la.name if la is not None else r.la,
            "la_ods": r.la,
        }
        if la is not None:
            # the same choice as the CareTeam telecom: office hours while the LA's office is open, else emergency duty
            is_open = office_open(la.office_hours, now)
            office = (OFFICE_HOURS[1], la.office_hours_phone)
            duty = (EMERGENCY_DUTY[1], la.emergency_duty_phone)
            item["now"], item["other"] = (office, duty) if is_open else (duty, office)
        out.append(item)
    return out


@routes.get("/children/{view}")
@page
async def child(request: web.Request, session: Session) -> web.StreamResponse:
    """The child's page: a read of what the access found (audited as read.ed-view; not another access)."""
    children = session.get("children") or {}
    raw = children.get(request.match_info["view"]) if isinstance(children, dict) else None
    if not isinstance(raw, str):
        raise web.HTTPNotFound()
    who = request[PRINCIPAL]
    service = request.config_dict[SERVICES].access
    records, accesses = await service.history(NhsNumber(raw), ctx=_ctx(request, who), kind="ed-view")
    names = request.config_dict[REGISTRY].care_setting_names()
    visits = [
        {"when": plain_instant(a.occurred_at), "where": names.get(a.care_setting, (a.care_setting, ""))[0]}
        for _, a in accesses
    ]
    return render(
        request,
        "child.html",
        {"nhs": raw, "plans": _plans(request, records, service.today()), "visits": visits, "section": "child"},
        session,
    )


@routes.get("/")
@page
async def home(request: web.Request, session: Session) -> web.StreamResponse:
    return render(request, "lookup.html", {"section": "lookup"}, session)


@routes.post("/children")
@page
async def lookup(request: web.Request, session: Session) -> web.StreamResponse:
    """The NHS number is posted, never put in a URL; opening the child's page is an access."""
    form = await checked_form(request, session)
    raw = "".join(form.get("nhs", "").split())
    settings = request.config_dict[SETTINGS]
    try:
        nhs = NhsNumber.parse(raw, test_range_only=settings.only_test_numbers)
    except InvalidNhsNumber:
        return render(
            request,
            "lookup.html",
            {"errors": {"nhs": "Enter a valid 10-digit NHS number, like 999 000 0018"}, "nhs": raw[:20]},
            session,
            status=400,
        )
    who = request[PRINCIPAL]
    setting = request.config_dict[REGISTRY].care_settings[who.ods]
    view_id = await _open(request, session, who, setting, nhs)
    raise web.HTTPSeeOther(f"{PREFIX}/children/{quote(view_id, safe='')}")


# -- dev sign-in, sign-out ------------------------------------------------------------------------------------------
@routes.get("/sign-in")
@allow(public=True)
async def sign_in_page(request: web.Request) -> web.StreamResponse:
    session = await get_session(request)
    return _sign_in(request, session, {})


def _sign_in(request: web.Request, session: Session, context: dict[str, Any], status: int = 200) -> web.Response:
    settings = request.config_dict[SETTINGS]
    places = sorted(request.config_dict[REGISTRY].care_settings.values(), key=lambda c: c.name)
    return render(
        request, "sign_in.html", {"dev": settings.dev_mode, "places": places, **context}, session, status=status
    )


@routes.post("/sign-in")
@allow(public=True)
async def sign_in(request: web.Request) -> web.StreamResponse:
    """Dev mode only: sign in as a clinician of one of the registry's care settings. Failures are counted per
    client address (rate limited, shared with the launch's failures) and audited."""
    settings = request.config_dict[SETTINGS]
    if not settings.dev_mode:
        raise web.HTTPNotFound()
    session = await get_session(request)
    form = await checked_form(request, session)
    ods, name = form.get("ods", ""), " ".join(form.get("name", "").split())[:100]
    blocked = await _refused_if_blocked(request, ods[:16] or "-", method="ed-dev")
    if blocked is not None:
        return blocked
    errors = {}
    if ods not in request.config_dict[REGISTRY].care_settings:
        errors["ods"] = "Select your care setting"
    if not name:
        errors["name"] = "Enter your name"
    if errors:
        _count(request, "ed-dev", "failed", "form")
        await request.config_dict[SERVICES].ed_signin.failed(request.remote or "-")
        await request.config_dict[SERVICES].audit.append(
            None,
            _system_ctx(request, ods[:16] or "-").entry("web.ed.signin.failed", None, _now(), fields=sorted(errors)),
        )
        return _sign_in(request, session, {"errors": errors, "form": form}, status=400)
    session = await new_session(request)
    session[SIGNED_IN] = {"role": CS.value, "ods": ods, "sub": f"dev:{name}", "name": name, "via": "dev"}
    csrf_token(session)
    who = clinician(session)
    assert who is not None
    await request.config_dict[SERVICES].audit.append(
        None, _ctx(request, who).entry("web.signin", None, _now(), method="dev")
    )
    _count(request, "ed-dev", "signed-in")
    raise web.HTTPSeeOther(f"{PREFIX}/")


@routes.post("/sign-out")
@page
async def sign_out(request: web.Request, session: Session) -> web.StreamResponse:
    await checked_form(request, session)
    await request.config_dict[SERVICES].audit.append(
        None, _ctx(request, request[PRINCIPAL]).entry("web.signout", None, _now())
    )
    session.invalidate()
    raise web.HTTPSeeOther(f"{PREFIX}/signed-out")


@routes.get("/signed-out")
@allow(public=True)
async def signed_out(request: web.Request) -> web.StreamResponse:
    return render(request, "signed_out.html", {})


def make_app(parent: web.Application) -> web.Application:
    loaders: list[jinja2.BaseLoader] = [
        jinja2.FileSystemLoader(HERE / "templates" / "ed"),
        jinja2.PackageLoader("nhsuk_frontend_jinja"),
    ]
    app = make_subapp(parent, templates=loaders, cookie=COOKIE)
    app.middlewares.append(framing)
    app[CONFIGS] = {}  # keys are registered issuers only: bounded by the registry
    app.router.add_routes(routes)
    app.router.add_get("/assets/{path:.+}", assets_handler(STATIC))

    async def http_client(sub: web.Application) -> Any:
        sub[TLS] = tls = ssl.create_default_context()  # the system's trust store
        sub[HTTP] = client = httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S, follow_redirects=False, verify=tls)
        yield
        await client.aclose()

    app.cleanup_ctx.append(http_client)
    return app
