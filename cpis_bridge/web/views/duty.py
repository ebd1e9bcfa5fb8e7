"""The duty-team view under /la/: sign-in (the dev sign-in page in dev mode), the LA's notifications (list with
filters and paging, one notification, acknowledge), child look-up by NHS number, sign-out. GOV.UK Design System."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any
from urllib.parse import quote

import jinja2
import orjson
from aiohttp import web
from aiohttp_session import Session, get_session, new_session
from aiohttp_sse import sse_response

from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import today_london, utc_now
from cpis_bridge.core.errors import NotFound, ValidationFailed
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.core.records import parse_day
from cpis_bridge.services.inbox import InboxFeed, InboxFilter
from cpis_bridge.web.common import PRINCIPAL, REQUEST_ID, allow, audit_context
from cpis_bridge.web.state import METRICS, REGISTRY, SERVICES, SETTINGS
from cpis_bridge.web.views.oidc import OidcSignIns, ProviderUnavailable, SignInFailed
from cpis_bridge.web.views.pages import (
    HERE,
    SESSIONS,
    SIGNED_IN,
    STATIC,
    assets_handler,
    checked_form,
    csrf_token,
    london,
    make_subapp,
    nhs_spaced,
    render,
    signed_in,
)

LA = Role.LOCAL_AUTHORITY
PREFIX = "/la"
SIGN_IN = f"{PREFIX}/sign-in"
PAGE_SIZE = 25
CALLBACK = f"{SIGN_IN}/callback"
PENDING = "oidc"  # the session's sign-in attempt in progress: state, nonce, code verifier, council
ID_TOKEN = "id_token"
OIDC = web.AppKey("oidc_sign_ins", OidcSignIns)
STREAMS = web.AppKey("live_streams", dict[str, set[asyncio.Queue[dict[str, Any] | None]]])  # by session id
FEED = web.AppKey("inbox_feed", InboxFeed)
SESSION_CHECK_S = 30.0  # how often a live stream checks that its session has not ended

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
page = signed_in(LA, SIGN_IN)


@routes.get("/")
@allow(public=True)
async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(f"{PREFIX}/notifications")


# -- sign-in and sign-out -------------------------------------------------------------------------------------------
@routes.get("/sign-in")
@allow(public=True)
async def sign_in_page(request: web.Request) -> web.StreamResponse:
    session = await get_session(request)
    return _sign_in(request, session, {})


def _sign_in(request: web.Request, session: Session, context: dict[str, Any], status: int = 200) -> web.Response:
    settings = request.config_dict[SETTINGS]
    las = sorted(request.config_dict[REGISTRY].local_authorities.values(), key=lambda la: la.name)
    oidc = request.app[OIDC]
    offered = [la for la in las if oidc.offered(la.ods)]
    return render(
        request,
        "la/sign_in.html",
        {"dev": settings.dev_mode, "las": las, "offered": offered, **context},
        session,
        status=status,
    )


def _system_ctx(request: web.Request, ods: str) -> AuditContext:
    return AuditContext(Principal(subject="-", role=LA, ods=ods or "-"), None, request.get(REQUEST_ID))


def _client(request: web.Request) -> str:
    return request.remote or "-"


async def _blocked(request: web.Request, method: str, ods: str) -> web.Response | None:
    """The 429 page when this address, or this LA, has had too many failed sign-ins lately (audited, counted)."""
    known = ods in request.config_dict[REGISTRY].local_authorities
    if not (
        await request.config_dict[SERVICES].signin.blocked(_client(request))
        or (known and await request.config_dict[SERVICES].la_signin.blocked(ods))
    ):
        return None
    await request.config_dict[SERVICES].audit.append(
        None,
        _system_ctx(request, ods[:16] if known else "-").entry("web.signin.refused", None, utc_now(), method=method),
    )
    request.config_dict[METRICS].web_signins.labels(method, "refused", "rate-limited").inc()
    return render(request, "error.html", {"heading": "Too many attempts", "status": 429}, status=429)


async def _failed(request: web.Request, method: str, ods: str, reason: str, **detail: Any) -> None:
    """A failed sign-in: counted against the address and the LA, audited (never with what was typed or claimed)."""
    known = ods in request.config_dict[REGISTRY].local_authorities
    await request.config_dict[SERVICES].signin.failed(_client(request))
    if known:
        await request.config_dict[SERVICES].la_signin.failed(ods)
    await request.config_dict[SERVICES].audit.append(
        None,
        _system_ctx(request, ods[:16] if known else "-").entry(
            "web.signin.failed", None, utc_now(), method=method, reason=reason, **detail
        ),
    )
    request.config_dict[METRICS].web_signins.labels(method, "failed", reason).inc()
    log.info("web sign-in failed", extra={"method": method, "reason": reason, "la": ods if known else "-"})


async def _signed_in(
    request: web.Request, method: str, who: dict[str, Any], keep: dict[str, Any] | None = None
) -> web.StreamResponse:
    session = await new_session(request)  # a new id: a session fixed before sign-in is worth nothing after it
    session[SIGNED_IN] = who
    session.update(keep or {})
    csrf_token(session)
    await request.config_dict[SERVICES].audit.append(
        None,
        AuditContext(Principal(who["sub"], LA, who["ods"], who["name"]), None, request.get(REQUEST_ID)).entry(
            "web.signin", None, utc_now(), method=method
        ),
    )
    request.config_dict[METRICS].web_signins.labels(method, "signed-in", "-").inc()
    raise web.HTTPSeeOther(f"{PREFIX}/notifications")


@routes.post("/sign-in")
@allow(public=True)
async def sign_in(request: web.Request) -> web.StreamResponse:
    """Dev mode only: sign in as a person of one of the registry's LAs. Failures are counted per client address and
    per LA (rate limited) and audited."""
    settings = request.config_dict[SETTINGS]
    if not settings.dev_mode:
        raise web.HTTPNotFound()
    session = await get_session(request)
    form = await checked_form(request, session)
    ods, name = form.get("ods", ""), " ".join(form.get("name", "").split())[:100]
    refused = await _blocked(request, "dev", ods)
    if refused is not None:
        return refused
    errors = {}
    if ods not in request.config_dict[REGISTRY].local_authorities:
        errors["ods"] = "Select your council"
    if not name:
        errors["name"] = "Enter your name"
    if errors:
        await _failed(request, "dev", ods, "form", fields=sorted(errors))
        return _sign_in(request, session, {"errors": errors, "form": form}, status=400)
    return await _signed_in(request, "dev", {"role": LA.value, "ods": ods, "sub": f"dev:{name}", "name": name})


@routes.post("/sign-in/oidc")
@allow(public=True)
async def oidc_start(request: web.Request) -> web.StreamResponse:
    """Sign in with the council's own identity provider: authorization code with PKCE; the attempt's state, nonce
    and code verifier are kept in the (server-side) session until the provider sends the browser back."""
    session = await get_session(request)
    form = await checked_form(request, session)
    ods = form.get("council", "")
    oidc = request.app[OIDC]
    refused = await _blocked(request, "oidc", ods)
    if refused is not None:
        return refused
    if not oidc.offered(ods):
        return _sign_in(request, session, {"errors": {"council": "Select your council"}}, status=400)
    try:
        url, pending = await oidc.begin(ods, request.config_dict[SETTINGS].base_url + CALLBACK)
    except ProviderUnavailable as exc:
        log.warning("identity provider unavailable", extra={"la": ods, "reason": exc.reason})
        request.config_dict[METRICS].web_signins.labels("oidc", "failed", exc.reason).inc()
        return render(request, "error.html", {"heading": "Sign-in is not available", "status": 503}, status=503)
    session[PENDING] = pending
    raise web.HTTPSeeOther(url)


@routes.get("/sign-in/callback")
@allow(public=True)
async def oidc_callback(request: web.Request) -> web.StreamResponse:
    """Where the provider sends the browser back: the code is exchanged, the ID token checked (signature, issuer,
    audience, nonce, lifetime) and its claims mapped to the council the attempt was for."""
    session = await get_session(request)
    pending = session.pop(PENDING, None)
    ods = str(pending.get("ods", "")) if isinstance(pending, dict) else ""
    refused = await _blocked(request, "oidc", ods)
    if refused is not None:
        return refused
    if not isinstance(pending, dict):
        await _failed(request, "oidc", "-", "no-attempt")
        return render(request, "la/sign_in_failed.html", {"reason": "no-attempt"}, session, status=400)
    query = {k: v for k, v in request.query.items() if k in ("code", "state", "error")}
    try:
        person = await request.app[OIDC].finish(pending, query)
    except ProviderUnavailable as exc:
        log.warning("identity provider unavailable", extra={"la": ods, "reason": exc.reason})
        request.config_dict[METRICS].web_signins.labels("oidc", "failed", exc.reason).inc()
        return render(request, "error.html", {"heading": "Sign-in is not available", "status": 503}, status=503)
    except SignInFailed as exc:
        await _failed(request, "oidc", ods, exc.reason)
        status = 403 if exc.reason == "no-la" else 400
        return render(request, "la/sign_in_failed.html", {"reason": exc.reason}, session, status=status)
    who = {"role": LA.value, "ods": ods, "sub": f"oidc:{person.sub}", "name": person.name, "idp": ods}
    # the ID token stays server-side, for the provider's sign-out (id_token_hint)
    return await _signed_in(request, "oidc", who, {ID_TOKEN: person.id_token})


@routes.post("/sign-out")
@page
async def sign_out(request: web.Request, session: Session) -> web.StreamResponse:
    """Ends the session (its Redis key goes, this process's live streams of it end at once, other processes' within
    their next check) and, for a provider's sign-in, the provider's session too (RP-initiated logout)."""
    await checked_form(request, session)
    await request.config_dict[SERVICES].audit.append(None, audit_context(request).entry("web.signout", None, utc_now()))
    who, id_token, sid = session.get(SIGNED_IN) or {}, session.get(ID_TOKEN), session.identity
    session.invalidate()
    for queue in request.app[STREAMS].pop(str(sid), set()):
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(None)
    after = request.config_dict[SETTINGS].base_url + f"{PREFIX}/signed-out"
    if isinstance(who, dict) and who.get("idp") and isinstance(id_token, str):
        url = await request.app[OIDC].sign_out_url(str(who["idp"]), id_token, after)
        if url:
            raise web.HTTPSeeOther(url)
    raise web.HTTPSeeOther(f"{PREFIX}/signed-out")


@routes.get("/signed-out")
@allow(public=True)
async def signed_out(request: web.Request) -> web.StreamResponse:
    return render(request, "la/signed_out.html", {})


# -- notifications --------------------------------------------------------------------------------------------------
def _date(raw: str | None) -> dt.date | None:
    if not raw:
        return None
    try:
        return parse_day(raw, today_london())
    except ValueError:
        raise ValueError(raw) from None


@routes.get("/notifications")
@page
async def notifications(request: web.Request, session: Session) -> web.StreamResponse:
    q = request.query
    errors: dict[str, str] = {}
    dates: dict[str, dt.date | None] = {}
    for field in ("from", "to"):
        try:
            dates[field] = _date(q.get(field))
        except ValueError:
            errors[field] = f"Enter a real date for '{'From' if field == 'from' else 'To'}'"
            dates[field] = None
    settings_known = request.config_dict[REGISTRY].care_settings
    setting = q.get("setting") or None
    if setting is not None and setting not in settings_known:
        setting = None
    status = q.get("status") or "all"
    acked = {"new": False, "acknowledged": True}.get(status)
    flt = InboxFilter(since=dates["from"], until=dates["to"], care_setting=setting, acknowledged=acked)
    who = audit_context(request)
    items, following = await request.config_dict[SERVICES].inbox.browse(
        who, who.principal.ods, flt, q.get("before"), PAGE_SIZE
    )
    keep = {k: v for k, v in q.items() if k in ("from", "to", "setting", "status") and v}
    return render(
        request,
        "la/notifications.html",
        {
            "items": items,
            "next": following,
            "filters": keep,
            "errors": errors,
            "first": "before" in q,
            "care_settings": sorted(settings_known.values(), key=lambda c: c.name),
            "status": status,
        },
        session,
    )


@routes.get("/notifications/{id}")
@page
async def notification(request: web.Request, session: Session) -> web.StreamResponse:
    who = audit_context(request)
    body = await request.config_dict[SERVICES].inbox.notification(who, who.principal.ods, request.match_info["id"])
    records = await request.config_dict[SERVICES].records.list_for_number(
        who, who.principal.ods, body["subject"]["nhsNumber"]
    )
    return render(request, "la/notification.html", {"n": body, "records": records}, session)


@routes.post("/notifications/{id}/acknowledge")
@page
async def acknowledge(request: web.Request, session: Session) -> web.StreamResponse:
    await checked_form(request, session)
    who = audit_context(request)
    await request.config_dict[SERVICES].inbox.acknowledge(who, who.principal.ods, request.match_info["id"])
    raise web.HTTPSeeOther(f"{PREFIX}/notifications/{quote(request.match_info['id'], safe='')}")


@routes.get("/events")
@page
async def events(request: web.Request, session: Session) -> web.StreamResponse:
    """Live updates (Server-Sent Events) for the notifications page: a ``ready`` event once the process tails the
    inboxes, then each new notification of this LA, as the few fields a new table row shows. The stream ends with
    the session (at once on sign-out in this process), or when the service shuts down."""
    la = request[PRINCIPAL].ods
    feed, sessions = request.app[FEED], request.app[SESSIONS]
    sid = str(session.identity)
    check_s = min(SESSION_CHECK_S, request.config_dict[SETTINGS].web_session_idle_s / 2)
    queue = feed.watch(la)
    request.app[STREAMS].setdefault(sid, set()).add(queue)
    try:
        async with sse_response(
            request, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
        ) as stream:
            with contextlib.suppress(TimeoutError):  # "ready": from here on, every new notification is sent
                async with asyncio.timeout(5.0):
                    await feed.started.wait()
            await stream.send("{}", event="ready")  # an event with no data is never dispatched
            while True:
                try:
                    body = await asyncio.wait_for(queue.get(), check_s)
                except TimeoutError:
                    if not await sessions.alive(sid):
                        break
                    continue
                if body is None:
                    break
                await stream.send(orjson.dumps(_live_row(body)).decode(), event="notification")
    finally:
        feed.unwatch(la, queue)
        mine = request.app[STREAMS].get(sid)
        if mine is not None:
            mine.discard(queue)
            if not mine:
                del request.app[STREAMS][sid]
    return stream


def _live_row(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "href": f"{PREFIX}/notifications/{body['id']}",
        "seen": london(body["access"]["occurredAt"]),
        "nhs": nhs_spaced(body["subject"]["nhsNumber"]),
        "where": body["access"]["careSetting"]["name"],
        "plans": ", ".join(r["planType"] for r in body["records"]),
    }


FEED_TASK = web.AppKey("inbox_feed_task", asyncio.Task[None])
FEED_STOP = web.AppKey("inbox_feed_stop", asyncio.Event)


async def end_streams(app: web.Application) -> None:
    """On shutdown, before Redis closes: the tail stops and every open stream ends. Never waits long for the
    tail (a blocked read may take a moment to notice its cancellation)."""
    app[FEED].close()
    app[FEED_STOP].set()
    task = app[FEED_TASK]
    task.cancel()
    await asyncio.wait({task}, timeout=5.0)


# -- child look-up --------------------------------------------------------------------------------------------------
@routes.get("/children")
@page
async def child_form(request: web.Request, session: Session) -> web.StreamResponse:
    return render(request, "la/child.html", {}, session)


@routes.post("/children")
@page
async def child_lookup(request: web.Request, session: Session) -> web.StreamResponse:
    """The number is posted, never put in a URL. This LA's records, and the child's access history when it holds
    one (both reads audited)."""
    form = await checked_form(request, session)
    raw = "".join(form.get("nhs", "").split())
    who = audit_context(request)
    la = who.principal.ods
    try:
        records = await request.config_dict[SERVICES].records.list_for_number(who, la, raw)
    except ValidationFailed:
        return render(
            request,
            "la/child.html",
            {"errors": {"nhs": "Enter a 10-digit NHS number, like 999 000 0018"}, "nhs": raw[:20]},
            session,
            status=400,
        )
    accesses: list[dict[str, Any]] = []
    if records:
        try:
            accesses = await request.config_dict[SERVICES].inbox.child_accesses(who, la, NhsNumber.parse(raw))
        except NotFound:
            accesses = []
    return render(
        request, "la/child.html", {"searched": True, "nhs": raw, "records": records, "accesses": accesses}, session
    )


def make_app(parent: web.Application) -> web.Application:
    loaders: list[jinja2.BaseLoader] = [
        jinja2.FileSystemLoader(HERE / "templates"),
        jinja2.PrefixLoader({"govuk_frontend_jinja": jinja2.PackageLoader("govuk_frontend_jinja")}),
    ]
    settings = parent[SETTINGS]
    oidc = OidcSignIns(parent[REGISTRY], settings.env_secret)
    app = make_subapp(parent, templates=loaders, cookie="__Host-cpis-la", form_targets=oidc.origins())
    app[OIDC] = oidc
    app[STREAMS] = {}
    app.router.add_routes(routes)
    app.router.add_get("/assets/{path:.+}", assets_handler(STATIC))

    async def start_feed(sub: web.Application) -> None:
        inbox = parent[SERVICES].inbox  # built when the parent's store opened, before this runs
        sub[FEED] = feed = InboxFeed(
            inbox.inbox, sorted(parent[REGISTRY].local_authorities), unreadable=inbox.unreadable
        )
        sub[FEED_STOP] = stop = asyncio.Event()
        sub[FEED_TASK] = asyncio.create_task(feed.run(stop), name="inbox-feed")

    app.on_startup.append(start_feed)
    app.on_shutdown.append(end_streams)
    return app
