"""What the server-rendered views share: the sub-application (templates, sessions, security headers, HTML error
pages), the signed-in person, CSRF tokens, the vendored frontend assets and display filters."""

from __future__ import annotations

import datetime as dt
import hmac
import mimetypes
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import markupsafe
import orjson
from aiohttp import web
from aiohttp_session import SESSION_KEY, AbstractStorage, Session, get_session, session_middleware

from cpis_bridge.core.clock import LONDON
from cpis_bridge.core.errors import CpisError
from cpis_bridge.core.ports import WebSessions
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.web.common import PRINCIPAL, Handler, allow
from cpis_bridge.web.state import SERVICES, SETTINGS

HERE = Path(__file__).parent
STATIC = HERE / "static"
CSRF_FIELD = "csrf_token"
SIGNED_IN = "who"  # the session's identity: {"ods", "sub", "name"}
ViewHandler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors {ancestors}"
)


def london(value: dt.datetime | str | None, fmt: str = "%d %b %Y %H:%M") -> str:
    """An instant as Europe/London wall-clock text (ISO strings from the API shapes accepted)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(LONDON).strftime(fmt)


def day(value: dt.date | str | None) -> str:
    if not value:
        return ""
    if isinstance(value, str):
        value = dt.date.fromisoformat(value)
    return value.strftime("%d %b %Y")


def nhs_spaced(value: str) -> str:
    """An NHS number as people read it: 3 3 4."""
    digits = "".join(c for c in str(value) if c.isdigit())
    return f"{digits[:3]} {digits[3:6]} {digits[6:]}" if len(digits) == 10 else str(value)


def make_subapp(
    parent: web.Application,
    *,
    templates: list[jinja2.BaseLoader],
    cookie: str,
    frame_ancestors: Callable[[], str] = lambda: "'none'",
    form_targets: tuple[str, ...] = (),
) -> web.Application:
    """A view's sub-application: its own middlewares (so the API's hot paths pay nothing for sessions), Jinja2
    templates, a Redis session store on the parent's Redis and the security headers on every answer.
    ``form_targets``: origins besides the service's own that a form may lead to (an identity provider, reached by
    a redirect after sign-in and sign-out forms; the CSP's form-action covers redirects)."""
    settings = parent[SETTINGS]
    storage = SessionStorage(lambda: parent[SERVICES].sessions, cookie_name=cookie, idle_s=settings.web_session_idle_s)
    secure_site = settings.base_url.startswith("https://")
    forms = "".join(f" {origin}" for origin in form_targets)
    policy = CSP.replace("form-action 'self';", f"form-action 'self'{forms};")

    @web.middleware
    async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
            if response.prepared:  # a stream (live updates) set its own headers before it started
                return response
        except web.HTTPException as exc:
            if exc.status < 400:
                response = exc
            else:
                response = error_page(request, exc.status, exc.reason)
        except CpisError as exc:
            if exc.status >= 500:
                raise
            response = error_page(request, exc.status, exc.title)
        h = response.headers
        h.setdefault("Content-Security-Policy", policy.format(ancestors=frame_ancestors()))
        h["X-Content-Type-Options"] = "nosniff"
        h["Referrer-Policy"] = "no-referrer"
        h.setdefault("Cache-Control", "no-store")
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if "frame-ancestors 'none'" in h["Content-Security-Policy"]:
            h["X-Frame-Options"] = "DENY"
        if secure_site or request.secure or request.headers.get("X-Forwarded-Proto") == "https":
            h["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
        if isinstance(response, web.HTTPException):
            raise response
        return response

    app = web.Application(middlewares=[headers, session_middleware(storage)])
    app[SESSIONS] = storage
    # auto_reload off: the templates are package files, and checking each one's mtime on every render and macro
    # import was most of a page's time
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.ChoiceLoader(templates),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        auto_reload=False,
    )
    env.filters.update(london=london, day=day, nhs=nhs_spaced)
    env.globals["fixed"] = _fixed_parts(env)
    return app


class SessionStorage(AbstractStorage):
    """aiohttp-session storage on the store's WebSessions: the cookie carries only a random id. The cookie has no
    expiry of its own (it ends with the browser); the stored session expires ``idle_s`` after the last request."""

    def __init__(self, sessions: Callable[[], WebSessions], *, cookie_name: str, idle_s: int) -> None:
        super().__init__(cookie_name=cookie_name, path="/", secure=True, httponly=True, samesite="Lax")
        self._sessions = sessions  # the app's store exists only once it has started
        self.idle_s = idle_s

    async def load_session(self, request: web.Request) -> Session:
        sid = self.load_cookie(request)
        if not sid or len(sid) > 64:
            return Session(None, data=None, new=True)
        raw = await self._sessions().load(sid)
        if raw is None:
            return Session(None, data=None, new=True)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Session(None, data=None, new=True)
        return Session(sid, data=data, new=False)

    async def save_session(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        sessions = self._sessions()
        old = self.load_cookie(request)
        if session.empty:
            if old and len(old) <= 64:
                await sessions.drop(old)
            self.save_cookie(response, "")
            return
        sid = session.identity
        if sid is None:
            sid = secrets.token_urlsafe(32)
            if old and len(old) <= 64:  # a new session (sign-in) replaces the one the browser held
                await sessions.drop(old)
            self.save_cookie(response, sid)
        await sessions.save(str(sid), orjson.dumps(self._get_session_data(session)), self.idle_s)

    async def alive(self, sid: str) -> bool:
        """Whether the session still exists (a long-lived stream checks now and then that it has not ended)."""
        return await self._sessions().alive(sid)


SESSIONS = web.AppKey("sessions", SessionStorage)


FIXED_PARTS = 4096  # distinct rendered parts kept; past it the cache starts again (filter values come from URLs)


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a part's argument (dicts and lists of plain values, frozen dataclasses)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _fixed_parts(env: jinja2.Environment) -> Callable[..., markupsafe.Markup]:
    """``fixed(template, **args)``: a page part that depends only on its few arguments (header, navigation,
    footer, the notifications filter form), rendered once per distinct arguments. GOV.UK Frontend's macros are most
    of a page's render time."""
    cache: dict[tuple[Any, ...], markupsafe.Markup] = {}

    def fixed(template: str, **args: Any) -> markupsafe.Markup:
        key = (template, *sorted((k, _frozen(v)) for k, v in args.items()))
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= FIXED_PARTS:
                cache.clear()
            # the output of an autoescaped template, so already safe markup
            hit = cache[key] = markupsafe.Markup(env.get_template(template).render(**args))  # noqa: S704
        return hit

    return fixed


def error_page(request: web.Request, status: int, title: str) -> web.Response:
    messages = {
        404: "Page not found",
        403: "You cannot see this page",
        400: "There is a problem with the form",
        429: "Too many attempts",
        405: "Page not found",
    }
    heading = messages.get(status, title)
    session = request.get(SESSION_KEY)  # loaded: the person is signed in, and the page keeps its sign-out form
    return render(request, "error.html", {"heading": heading, "status": status}, session, status=status)


def assets_handler(root: Path) -> Handler:
    """The vendored frontend files (public, long-cached), resolved inside ``root`` only."""
    base = root.resolve()

    @allow(public=True)
    async def assets(request: web.Request) -> web.StreamResponse:
        try:
            path = (base / request.match_info["path"]).resolve()
            found = path.is_relative_to(base) and path.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte: no such file either
            found = False
        if not found:
            raise web.HTTPNotFound()
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".js":
            ctype = "text/javascript"
        elif path.suffix == ".woff2":
            ctype = "font/woff2"
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=86400", "Content-Type": ctype})

    return assets


# -- CSRF ---------------------------------------------------------------------------------------------------------
def csrf_token(session: Session) -> str:
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


async def checked_form(request: web.Request, session: Session) -> dict[str, str]:
    """The posted form, after its CSRF token matched the session's (a 400 page otherwise)."""
    form = await request.post()
    sent = form.get(CSRF_FIELD)
    token = session.get(CSRF_FIELD)
    if not isinstance(sent, str) or not isinstance(token, str) or not hmac.compare_digest(sent, token):
        raise web.HTTPBadRequest(reason="The form has expired")
    return {k: v for k, v in form.items() if isinstance(v, str)}


# -- the signed-in person -----------------------------------------------------------------------------------------
def person(session: Session, role: Role) -> Principal | None:
    who = session.get(SIGNED_IN)
    if not isinstance(who, dict) or who.get("role") != role.value:
        return None
    return Principal(subject=str(who["sub"]), role=role, ods=str(who["ods"]), name=who.get("name") or None)


def signed_in(role: Role, sign_in_path: str) -> Callable[[ViewHandler], Handler]:
    """A page for signed-in people of ``role``: others go to ``sign_in_path``. The middleware's bearer check does
    not apply (the route is public to it); the session is the credential. Every request renews the idle timeout."""

    def wrap(view: ViewHandler) -> Handler:
        @allow(public=True)
        async def handler(request: web.Request) -> web.StreamResponse:
            session = await get_session(request)
            who = person(session, role)
            if who is None:
                raise web.HTTPSeeOther(sign_in_path)
            request[PRINCIPAL] = who
            session.changed()  # saved again: the Redis key's idle timeout starts over
            return await view(request, session)

        handler.__name__ = view.__name__
        handler.__doc__ = view.__doc__
        return handler

    return wrap


def render(
    request: web.Request, template: str, context: dict[str, Any], session: Session | None = None, status: int = 200
) -> web.Response:
    ctx = dict(context)
    if session is not None:
        ctx.setdefault("csrf", csrf_token(session))
        ctx.setdefault("who", person(session, Role.LOCAL_AUTHORITY))
    return aiohttp_jinja2.render_template(template, request, ctx, status=status)
