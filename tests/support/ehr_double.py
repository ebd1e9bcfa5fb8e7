"""A real aiohttp EHR double for the clinician view's SMART App Launch (EHR launch): the SMART configuration under
its FHIR base, an authorize endpoint that approves at once (checking client, redirect URI, launch, aud and the PKCE
S256 challenge), a token endpoint that checks the code and the PKCE verifier and answers with the launch context
(patient, appContext), and the ways a launch goes wrong on purpose: a wrong state, a bad code, a refusal, another
appContext or patient in the token response."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import web

CLIENT_ID = "cpis-clinician-view"


@dataclass
class Launch:
    app_context: str
    patient: str


@dataclass
class Grant:
    launch: Launch
    challenge: str
    redirect_uri: str
    client_id: str


@dataclass
class Ehr:
    """The EHR's state. ``mode``: "" (behaves), "wrong-state", "bad-code", "deny", "other-context",
    "other-patient", "no-s256" (its configuration does not list PKCE S256)."""

    mode: str = ""
    client_id: str = CLIENT_ID
    launches: dict[str, Launch] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, query or form) of every request
    base: str = ""

    @property
    def iss(self) -> str:
        return self.base + "/fhir"

    def new_launch(self, app_context: str, patient: str = "pat-1") -> str:
        """What the EHR does when a clinician follows a card's SMART link: a launch id for the app's launch URL."""
        launch_id = secrets.token_urlsafe(12)
        self.launches[launch_id] = Launch(app_context, patient)
        return launch_id

    def launch_url(self, app_url: str, launch_id: str) -> str:
        return f"{app_url}?{urlencode({'iss': self.iss, 'launch': launch_id})}"

    # -- handlers -------------------------------------------------------------------------------------------------
    async def configuration(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.query)))
        return web.json_response(
            {
                "issuer": self.iss,
                "authorization_endpoint": self.base + "/auth/authorize",
                "token_endpoint": self.base + "/auth/token",
                "capabilities": ["launch-ehr", "client-public", "context-ehr-patient"],
                "code_challenge_methods_supported": ["plain"] if self.mode == "no-s256" else ["S256"],
                "grant_types_supported": ["authorization_code"],
            }
        )

    async def authorize(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.seen.append((request.path, q))
        problems = [
            name
            for name, ok in (
                ("response_type", q.get("response_type") == "code"),
                ("client_id", q.get("client_id") == self.client_id),
                ("launch", q.get("launch") in self.launches),
                ("aud", q.get("aud") == self.iss),
                ("code_challenge_method", q.get("code_challenge_method") == "S256"),
                ("code_challenge", bool(q.get("code_challenge"))),
                ("state", bool(q.get("state"))),
                ("redirect_uri", bool(q.get("redirect_uri"))),
                ("scope", "launch" in (q.get("scope") or "").split()),
            )
            if not ok
        ]
        if problems:
            return web.json_response({"error": "invalid_request", "problems": problems}, status=400)
        state = q["state"] + ("x" if self.mode == "wrong-state" else "")
        if self.mode == "deny":
            back = {"error": "access_denied", "state": state}
        else:
            code = secrets.token_urlsafe(16)
            self.grants[code] = Grant(
                self.launches[q["launch"]], q["code_challenge"], q["redirect_uri"], q["client_id"]
            )
            back = {"code": "not-" + code if self.mode == "bad-code" else code, "state": state}
        raise web.HTTPFound(q["redirect_uri"] + "?" + urlencode(back))

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.seen.append((request.path, {k: v for k, v in form.items() if k != "code_verifier"}))
        grant = self.grants.pop(form.get("code", ""), None)
        if grant is None or form.get("grant_type") != "authorization_code":
            return web.json_response({"error": "invalid_grant"}, status=400)
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if digest != grant.challenge:
            return web.json_response({"error": "invalid_grant", "error_description": "PKCE"}, status=400)
        if form.get("redirect_uri") != grant.redirect_uri or form.get("client_id") != grant.client_id:
            return web.json_response({"error": "invalid_grant"}, status=400)
        app_context = grant.launch.app_context
        if self.mode == "other-context":
            app_context = secrets.token_urlsafe(24)
        patient = "pat-other" if self.mode == "other-patient" else grant.launch.patient
        return web.json_response(
            {
                "access_token": secrets.token_urlsafe(24),
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "launch openid fhirUser",
                "patient": patient,
                "appContext": app_context,
            },
            headers={"Cache-Control": "no-store"},
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/fhir/.well-known/smart-configuration", self.configuration)
        app.router.add_get("/auth/authorize", self.authorize)
        app.router.add_post("/auth/token", self.token)
        return app


class EhrThread:
    """The EHR served from its own thread and event loop (for the browser tests, which are synchronous)."""

    def __init__(self, ehr: Ehr) -> None:
        self.ehr = ehr
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="ehr-double")

    def start(self) -> EhrThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.ehr.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.ehr.base = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def registry_with_smart(ehr: Ehr, ods: str = "RXX01") -> str:
    """The test registry with SMART launch from ``ehr`` registered for care setting ``ods``."""
    from tests.support.world import REGISTRY

    lines = []
    for line in REGISTRY.read_text().splitlines():
        if line.strip().startswith("- {ods: " + ods + ","):
            line = line.rstrip()[:-1] + (
                f", smartLaunch: {{clientId: {ehr.client_id}, issuers: ['{ehr.iss}'], frameOrigins: ['{ehr.base}']}}}}"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"
