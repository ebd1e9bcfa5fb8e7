"""The duty-team view under /la/: sign-in (the dev sign-in page in dev mode), the LA's notifications (list with
filters and paging, one notification, acknowledge), child look-up by NHS number, sign-out. GOV.UK Design System."""

from __future__ import annotations

import asyncio
import datetime as dt
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
from cpis_bridge.store.web import SignInLimiter
from cpis_bridge.web.common import PRINCIPAL, REQUEST_ID, allow, audit_context
from cpis_bridge.web.notifications import INBOX
from cpis_bridge.web.state import AUDIT, KEYS, RECORDS, REDIS, REGISTRY, SETTINGS
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
LIMITER = web.AppKey("signin_limiter", SignInLimiter)
FEED = web.AppKey("inbox_feed", InboxFeed)
SESSION_CHECK_S = 30.0  # how often a live stream checks that its session has not ended

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
    return render(request, "la/sign_in.html", {"dev": settings.dev_mode, "las": las, **context}, session, status=status)


def _system_ctx(request: web.Request, ods: str) -> AuditContext:
    return AuditContext(Principal(subject="-", role=LA, ods=ods or "-"), None, request.get(REQUEST_ID))


@routes.post("/sign-in")
@allow(public=True)
async def sign_in(request: web.Request) -> web.StreamResponse:
    """Dev mode only: sign in as a person of one of the registry's LAs. Failures are counted per client address
    (rate limited) and audited."""
    settings = request.config_dict[SETTINGS]
    if not settings.dev_mode:
        raise web.HTTPNotFound()
    session = await get_session(request)
    form = await checked_form(request, session)
    limiter, client = request.app[LIMITER], request.remote or "-"
    audit = request.config_dict[AUDIT]
    ods, name = form.get("ods", ""), " ".join(form.get("name", "").split())[:100]
    if await limiter.blocked(client):
        await audit.append(None, _system_ctx(request, ods[:16]).entry("web.signin.refused", None, utc_now()))
        return render(request, "error.html", {"heading": "Too many attempts", "status": 429}, status=429)
    errors = {}
    if ods not in request.config_dict[REGISTRY].local_authorities:
        errors["ods"] = "Select your council"
    if not name:
        errors["name"] = "Enter your name"
    if errors:
        await limiter.failed(client)
        await audit.append(
            None, _system_ctx(request, ods[:16]).entry("web.signin.failed", None, utc_now(), fields=sorted(errors))
        )
        return _sign_in(request, session, {"errors": errors, "form": form}, status=400)
    session = await new_session(request)  # a new id: a session fixed before sign-in is worth nothing after it
    who = {"role": LA.value, "ods": ods, "sub": f"dev:{name}", "name": name}
    session[SIGNED_IN] = who
    csrf_token(session)
    await audit.append(
        None,
        AuditContext(Principal(who["sub"], LA, ods, name), None, request.get(REQUEST_ID)).entry(
            "web.signin", None, utc_now(), method="dev"
        ),
    )
    raise web.HTTPSeeOther(f"{PREFIX}/notifications")


@routes.post("/sign-out")
@page
async def sign_out(request: web.Request, session: Session) -> web.StreamResponse:
    await checked_form(request, session)
    await request.config_dict[AUDIT].append(None, audit_context(request).entry("web.signout", None, utc_now()))
    session.invalidate()
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
    items, following = await request.config_dict[INBOX].browse(who, who.principal.ods, flt, q.get("before"), PAGE_SIZE)
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
    body = await request.config_dict[INBOX].notification(who, who.principal.ods, request.match_info["id"])
    records = await request.config_dict[RECORDS].list_for_number(who, who.principal.ods, body["subject"]["nhsNumber"])
    return render(request, "la/notification.html", {"n": body, "records": records}, session)


@routes.post("/notifications/{id}/acknowledge")
@page
async def acknowledge(request: web.Request, session: Session) -> web.StreamResponse:
    await checked_form(request, session)
    who = audit_context(request)
    await request.config_dict[INBOX].acknowledge(who, who.principal.ods, request.match_info["id"])
    raise web.HTTPSeeOther(f"{PREFIX}/notifications/{quote(request.match_info['id'], safe='')}")


@routes.get("/events")
@page
async def events(request: web.Request, session: Session) -> web.StreamResponse:
    """Live updates (Server-Sent Events) for the notifications page: each new notification of this LA, as the few
    fields a new table row shows. The stream ends with the session, or when the service shuts down."""
    la = request[PRINCIPAL].ods
    feed, sessions = request.app[FEED], request.app[SESSIONS]
    queue = feed.watch(la)
    try:
        async with sse_response(
            request, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
        ) as stream:
            while True:
                try:
                    body = await asyncio.wait_for(queue.get(), SESSION_CHECK_S)
                except TimeoutError:
                    if not await sessions.alive(str(session.identity)):
                        break
                    continue
                if body is None:
                    break
                await stream.send(orjson.dumps(_live_row(body)).decode(), event="notification")
    finally:
        feed.unwatch(la, queue)
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
        records = await request.config_dict[RECORDS].list_for_number(who, la, raw)
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
            accesses = await request.config_dict[INBOX].child_accesses(who, la, NhsNumber.parse(raw))
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
    app = make_subapp(parent, templates=loaders, cookie="__Host-cpis-la")
    settings = parent[SETTINGS]
    app[LIMITER] = SignInLimiter(lambda: (parent[REDIS], parent[KEYS]), limit=settings.web_signin_failures)
    app.router.add_routes(routes)
    app.router.add_get("/assets/{path:.+}", assets_handler(STATIC))

    async def start_feed(sub: web.Application) -> None:
        inbox = parent[INBOX]  # built when the parent's Redis started, before this runs
        sub[FEED] = feed = InboxFeed(
            inbox.inbox, sorted(parent[REGISTRY].local_authorities), unreadable=inbox.unreadable
        )
        sub[FEED_STOP] = stop = asyncio.Event()
        sub[FEED_TASK] = asyncio.create_task(feed.run(stop), name="inbox-feed")

    app.on_startup.append(start_feed)
    app.on_shutdown.append(end_streams)
    return app
