"""A small FHIR R4 REST client (aiohttp): authentication (bearer, OAuth2 client credentials with a client secret or
a private_key_jwt assertion), one pause gate per server honouring Retry-After, short transient retries."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote_plus

import aiohttp
import jwt
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

log = logging.getLogger("cpis_bridge.fhir.client")

FHIR_JSON = "application/fhir+json"
TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class FhirUnavailable(RuntimeError):
    """The server could not be reached or did not answer in time (after the short retries)."""


class AuthFailed(RuntimeError):
    """The token endpoint refused or could not be reached."""


@dataclass(frozen=True, slots=True)
class FhirResponse:
    status: int
    headers: Mapping[str, str]
    body: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


# -- authentication -------------------------------------------------------------------------------------------


class Auth(Protocol):
    async def header(self, session: aiohttp.ClientSession) -> str | None: ...

    def invalidate(self) -> None: ...


class NoAuth:
    async def header(self, session: aiohttp.ClientSession) -> str | None:
        return None

    def invalidate(self) -> None:
        return None


@dataclass
class StaticBearer:
    token: str

    async def header(self, session: aiohttp.ClientSession) -> str | None:
        return f"Bearer {self.token}"

    def invalidate(self) -> None:
        return None


@dataclass
class ClientCredentials:
    """OAuth2 client credentials. With ``private_key`` the client authenticates with a signed JWT assertion
    (SMART Backend Services: RS384/ES384; NHS England: RS512 with ``kid``), else with ``client_secret`` (Basic).
    The token is cached and refreshed ``refresh_margin_s`` before it expires."""

    token_url: str
    client_id: str
    client_secret: str | None = None
    private_key: str | None = None
    kid: str | None = None
    alg: str = "RS384"
    scope: str | None = None
    refresh_margin_s: float = 60.0
    clock: Any = time.time
    _token: str | None = field(default=None, init=False)
    _expires: float = field(default=0.0, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    fetched: int = field(default=0, init=False)

    def assertion(self) -> str:
        now = int(self.clock())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url, "jti": str(uuid.uuid4()),
                  "iat": now, "exp": now + 300}
        headers = {"typ": "JWT"}
        if self.kid:
            headers["kid"] = self.kid
        assert self.private_key is not None
        return jwt.encode(claims, self.private_key, algorithm=self.alg, headers=headers)

    async def header(self, session: aiohttp.ClientSession) -> str | None:
        if self._token is None or self.clock() >= self._expires - self.refresh_margin_s:
            async with self._lock:
                if self._token is None or self.clock() >= self._expires - self.refresh_margin_s:
                    await self._fetch(session)
        return f"Bearer {self._token}"

    def invalidate(self) -> None:
        self._token = None

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers: dict[str, str] = {}
        if self.private_key:
            form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            form["client_assertion"] = self.assertion()
            form["client_id"] = self.client_id
        else:
            headers["Authorization"] = basic_auth(self.client_id, self.client_secret or "")
        try:
            async with session.post(self.token_url, data=form, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=10, connect=5)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise AuthFailed(f"token endpoint answered {resp.status}")
                data = orjson.loads(body)
        except TRANSIENT as exc:
            raise AuthFailed(f"token endpoint unreachable: {type(exc).__name__}") from exc
        except orjson.JSONDecodeError as exc:
            raise AuthFailed("token endpoint answered unreadable JSON") from exc
        token = data.get("access_token")
        if not isinstance(token, str):
            raise AuthFailed("token endpoint answered without access_token")
        self._token = token
        self._expires = self.clock() + float(data.get("expires_in", 300))
        self.fetched += 1
        log.info("fhir.token.fetched", extra={"expiresIn": data.get("expires_in")})


def basic_auth(client_id: str, secret: str) -> str:
    """client_secret_basic (RFC 6749 2.3.1: both parts form-urlencoded before Base64)."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def make_auth(mode: str, *, token: str | None = None, token_url: str | None = None, client_id: str | None = None,
              client_secret: str | None = None, private_key_file: Path | None = None, kid: str | None = None,
              alg: str = "RS384", scope: str | None = None) -> Auth:
    """The Auth for CPIS_FHIR_AUTH_MODE; raises ValueError naming the missing setting."""
    if mode == "none":
        return NoAuth()
    if mode == "bearer":
        if not token:
            raise ValueError("CPIS_FHIR_AUTH_TOKEN is required for CPIS_FHIR_AUTH_MODE=bearer")
        return StaticBearer(token)
    if not token_url or not client_id:
        raise ValueError("CPIS_FHIR_AUTH_TOKEN_URL and CPIS_FHIR_AUTH_CLIENT_ID are required for OAuth2 modes")
    if mode == "client-secret":
        if not client_secret:
            raise ValueError("CPIS_FHIR_AUTH_CLIENT_SECRET is required for CPIS_FHIR_AUTH_MODE=client-secret")
        return ClientCredentials(token_url, client_id, client_secret=client_secret, scope=scope)
    if mode == "private-key-jwt":
        if private_key_file is None:
            raise ValueError("CPIS_FHIR_AUTH_PRIVATE_KEY_FILE is required for CPIS_FHIR_AUTH_MODE=private-key-jwt")
        if alg not in ("RS384", "ES384", "RS512"):
            raise ValueError("CPIS_FHIR_AUTH_ALG must be RS384, ES384 or RS512")
        return ClientCredentials(token_url, client_id, private_key=private_key_file.read_text(), kid=kid, alg=alg,
                                 scope=scope)
    raise ValueError(f"unknown CPIS_FHIR_AUTH_MODE {mode!r}")


# -- throttling headers ---------------------------------------------------------------------------------------

_T_PARAM = re.compile(r"(?:^|[;,\s])(?:t|reset)\s*=\s*(\d+(?:\.\d+)?)")


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def ratelimit_reset_s(headers: Mapping[str, str]) -> float | None:
    """The reset time (seconds) of an IETF RateLimit header (``t=``; older drafts ``reset=``/RateLimit-Reset)."""
    for name in ("RateLimit", "RateLimit-Reset"):
        value = headers.get(name)
        if not value:
            continue
        if name == "RateLimit-Reset":
            try:
                return max(0.0, float(value))
            except ValueError:
                continue
        match = _T_PARAM.search(value)
        if match:
            return float(match.group(1))
    return None


# -- the client -----------------------------------------------------------------------------------------------


class FhirClient:
    """One FHIR server. Every request first waits for the server's pause gate; a 429/503 with Retry-After closes
    the gate for every request to this server until it has passed."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, auth: Auth | None = None, *,
                 timeout_s: float = 15.0, transient_attempts: int = 3) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.auth = auth or NoAuth()
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s))
        self.transient_attempts = transient_attempts
        self._paused_until = 0.0  # time.monotonic()

    # -- the gate ---------------------------------------------------------------------------------------------
    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    async def _wait_gate(self) -> None:
        for _ in range(1000):  # the gate can be pushed further while we wait; bounded all the same
            delay = self.paused_for()
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    # -- requests ---------------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                      headers: Mapping[str, str] | None = None) -> FhirResponse:
        """Send one request; transport errors and timeouts are retried briefly, then raise FhirUnavailable."""
        data = None if body is None else orjson.dumps(body)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.transient_attempts), wait=wait_random_exponential(0.05, max=0.5),
                retry=retry_if_exception_type(TRANSIENT), reraise=True,
            ):
                with attempt:
                    return await self._once(method, path, data, headers)
        except TRANSIENT as exc:
            raise FhirUnavailable(f"{method} {type(exc).__name__}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, method: str, path: str, data: bytes | None,
                    extra: Mapping[str, str] | None) -> FhirResponse:
        for auth_try in range(2):
            await self._wait_gate()
            headers = {"Accept": FHIR_JSON}
            if data is not None:
                headers["Content-Type"] = FHIR_JSON
            headers.update(extra or {})
            auth = await self.auth.header(self.session)
            if auth:
                headers["Authorization"] = auth
            async with self.session.request(method, self.url(path), data=data, headers=headers,
                                            timeout=self.timeout) as resp:
                raw = await resp.read()
                status = resp.status
                resp_headers = {k: v for k, v in resp.headers.items()}
            if status == 401 and auth_try == 0 and auth:
                self.auth.invalidate()  # an expired or revoked token: fetch a new one once
                continue
            break
        self._note_throttle(status, resp_headers)
        body: dict[str, Any] | None = None
        if raw:
            try:
                parsed = orjson.loads(raw)
                body = parsed if isinstance(parsed, dict) else None
            except orjson.JSONDecodeError:
                body = None
        return FhirResponse(status, resp_headers, body)

    def _note_throttle(self, status: int, headers: Mapping[str, str]) -> None:
        if status in (429, 503):
            wait = retry_after_s(headers.get("Retry-After"))
            if wait is not None:
                self.pause(wait)
                log.warning("fhir.paused", extra={"status": status, "seconds": round(wait, 3)})

    async def capabilities(self) -> dict[str, Any]:
        resp = await self.request("GET", "metadata")
        if not resp.ok or not resp.body or resp.body.get("resourceType") != "CapabilityStatement":
            raise FhirUnavailable(f"metadata answered {resp.status}")
        return resp.body
