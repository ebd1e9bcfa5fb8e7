"""A small FHIR R4 REST client (aiohttp): authentication (bearer, OAuth2 client credentials with a client secret or
a private_key_jwt assertion), and per server: a pause gate (Retry-After, rate-limit resets, unreachable until a
probe answers), the rate-limit budget its RateLimit headers announce, an adaptive (AIMD) concurrency limit, short
transient retries."""

from __future__ import annotations

import asyncio
import base64
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
from multidict import CIMultiDict
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from cpis_bridge.core.backoff import retry_after_s
from cpis_bridge.fhir.formats import JSON_CT

log = logging.getLogger("cpis_bridge.fhir.client")

TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
OVERLOAD = frozenset({409, 429, 503})  # answers that halve the concurrency limit (as timeouts do)


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
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "exp": now + 300,
        }
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
            async with session.post(
                self.token_url, data=form, headers=headers, timeout=aiohttp.ClientTimeout(total=10, connect=5)
            ) as resp:
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


def make_auth(
    mode: str,
    *,
    token: str | None = None,
    token_url: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    private_key_file: Path | None = None,
    kid: str | None = None,
    alg: str = "RS384",
    scope: str | None = None,
) -> Auth:
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
        return ClientCredentials(
            token_url, client_id, private_key=private_key_file.read_text(), kid=kid, alg=alg, scope=scope
        )
    raise ValueError(f"unknown CPIS_FHIR_AUTH_MODE {mode!r}")


# -- throttling headers ---------------------------------------------------------------------------------------

_PARAM = re.compile(r"(?:^|[;,\s])(r|t|remaining|reset)\s*=\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_EPOCH_FLOOR = 1_000_000_000  # an X-RateLimit-Reset this large is a Unix time, not a delta


@dataclass(frozen=True, slots=True)
class RateLimit:
    """What a server's rate-limit headers say: requests left in the window and seconds until it resets."""

    remaining: int | None
    reset_s: float | None


def rate_limit(headers: Mapping[str, str], now: float | None = None) -> RateLimit | None:
    """The IETF RateLimit headers in each shape servers send: the structured field (``"default";r=0;t=30``, with
    several policies the tightest), the combined draft (``limit=100, remaining=0, reset=30``), the split draft
    (``RateLimit-Remaining``/``RateLimit-Reset``) and the de-facto ``X-RateLimit-*`` (reset as delta or Unix time)."""
    remaining: list[int] = []
    reset: list[float] = []
    value = headers.get("RateLimit")
    if value:
        for name, number in _PARAM.findall(value):
            if name.lower() in ("r", "remaining"):
                remaining.append(int(float(number)))
            else:
                reset.append(float(number))
    for prefix in ("RateLimit-", "X-RateLimit-"):
        for name in ("Remaining", "Reset"):
            raw = headers.get(prefix + name)
            if not raw:
                continue
            try:
                number = float(raw.split(",")[0].strip())
            except ValueError:
                continue
            if name == "Remaining":
                remaining.append(int(number))
                continue
            if number >= _EPOCH_FLOOR:
                number -= time.time() if now is None else now
            reset.append(number)
    if not remaining and not reset:
        return None
    return RateLimit(min(remaining) if remaining else None, max(0.0, max(reset)) if reset else None)


def ratelimit_reset_s(headers: Mapping[str, str]) -> float | None:
    """The reset time (seconds) of the rate-limit headers, if any."""
    limit = rate_limit(headers)
    return None if limit is None else limit.reset_s


# -- pacing -----------------------------------------------------------------------------------------------------


class AdaptiveLimit:
    """How many requests may be in flight to one server: additive increase (about +1 per window of successes),
    multiplicative decrease (halved) on conflict, throttling or timeout. Only answers to requests sent after the
    last decrease can decrease it again, so one burst of failures halves it once."""

    def __init__(self, initial: int, *, minimum: int = 1, maximum: int = 32) -> None:
        self.limit = float(max(minimum, min(initial, maximum)))
        self.minimum = minimum
        self.maximum = maximum
        self.in_flight = 0
        self.decreased_at = 0.0
        self._cond = asyncio.Condition()

    async def acquire(self) -> float:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1
        return time.monotonic()

    async def release(self, sent_at: float, signal: str) -> None:
        """``signal``: "ok" (grow), "overload" (shrink), anything else leaves the limit."""
        if signal == "ok":
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        elif signal == "overload" and sent_at > self.decreased_at:
            self.limit = max(float(self.minimum), self.limit / 2)
            self.decreased_at = time.monotonic()
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify(max(1, int(self.limit) - self.in_flight))  # wake only those who can go


@dataclass
class Budget:
    """Requests the server still allows in its current rate-limit window (None: not told, or a new window)."""

    remaining: int | None = None
    window_end: float = 0.0  # time.monotonic()

    def take(self, now: float) -> float:
        """Spend one request; returns how long to wait first (until the window resets) when none is left."""
        if self.remaining is None:
            return 0.0
        if now >= self.window_end:
            self.remaining = None  # the window has reset: the next answer tells us the new count
            return 0.0
        if self.remaining <= 0:
            return self.window_end - now
        self.remaining -= 1
        return 0.0

    def note(self, limit: RateLimit, now: float, others_in_flight: int, throttled: bool) -> None:
        if limit.reset_s is None:
            return
        end = now + limit.reset_s
        left = 0 if throttled else limit.remaining
        if left is None:
            return
        left -= others_in_flight  # sent after this one was counted, or about to be: the server will count them
        same_window = self.remaining is not None and now < self.window_end and end <= self.window_end + 1.0
        self.remaining = min(self.remaining, left) if same_window and self.remaining is not None else left
        self.window_end = end if not same_window else max(self.window_end, end)


# -- the client -----------------------------------------------------------------------------------------------


class FhirClient:
    """One FHIR server. Every request waits for the server's pause gate (closed by 429/503 with Retry-After or a
    rate-limit reset, and by the sync relay while the server is unreachable), for the rate-limit budget the
    server announced (``RateLimit`` remaining/reset), and for a slot under the adaptive concurrency limit."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        auth: Auth | None = None,
        *,
        timeout_s: float = 15.0,
        transient_attempts: int = 3,
        concurrency: int = 8,
        max_concurrency: int = 32,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.auth = auth or NoAuth()
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s))
        self.transient_attempts = transient_attempts
        self.limit = AdaptiveLimit(concurrency, maximum=max(concurrency, max_concurrency))
        self.budget = Budget()
        self.sent = 0
        self.reachable = True  # False after transport failures: requests fail fast until a probe gets through
        self._paused_until = 0.0  # time.monotonic()

    # -- the gate ---------------------------------------------------------------------------------------------
    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def resume(self) -> None:
        self._paused_until = 0.0

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    async def _wait_gate(self) -> None:
        for _ in range(1000):  # the gate can be pushed further while we wait; bounded all the same
            delay = self.paused_for()
            if delay <= 0:
                delay = self.budget.take(time.monotonic())  # spends one request only when it may go now
                if delay <= 0:
                    return
            await asyncio.sleep(delay)

    # -- requests ---------------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        probe: bool = False,
    ) -> FhirResponse:
        """Send one request; transport errors and timeouts are retried briefly, then raise FhirUnavailable and mark
        the server unreachable: until a ``probe`` request gets an answer, others fail at once without sending."""
        if not self.reachable and not probe:
            raise FhirUnavailable(f"{method} not sent: the server is unreachable")
        data = None if body is None else orjson.dumps(body)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.transient_attempts),
                wait=wait_random_exponential(0.05, max=0.5),
                retry=retry_if_exception_type(TRANSIENT),
                reraise=True,
            ):
                with attempt:
                    resp = await self._limited(method, path, data, headers)
                    self.reachable = True
                    return resp
        except TRANSIENT as exc:
            self.reachable = False
            raise FhirUnavailable(f"{method} {type(exc).__name__}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _limited(
        self, method: str, path: str, data: bytes | None, extra: Mapping[str, str] | None
    ) -> FhirResponse:
        sent_at = await self.limit.acquire()
        signal = "none"
        try:
            resp = await self._once(method, path, data, extra)
            signal = "ok" if resp.ok else "overload" if resp.status in OVERLOAD else "none"
            return resp
        except TimeoutError:
            signal = "overload"
            raise
        finally:
            await self.limit.release(sent_at, signal)

    async def _once(self, method: str, path: str, data: bytes | None, extra: Mapping[str, str] | None) -> FhirResponse:
        for auth_try in range(2):
            await self._wait_gate()
            headers = {"Accept": JSON_CT}
            if data is not None:
                headers["Content-Type"] = JSON_CT
            headers.update(extra or {})
            auth = await self.auth.header(self.session)
            if auth:
                headers["Authorization"] = auth
            self.sent += 1
            async with self.session.request(
                method, self.url(path), data=data, headers=headers, timeout=self.timeout
            ) as resp:
                raw = await resp.read()
                status = resp.status
                resp_headers = CIMultiDict(resp.headers)  # header names are case-insensitive
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
        now = time.monotonic()
        limit = rate_limit(headers)
        if limit is not None:
            self.budget.note(limit, now, max(0, self.limit.in_flight - 1), status == 429)
        if status in (429, 503):
            wait = retry_after_s(headers.get("Retry-After"))
            if wait is None and status == 429 and limit is not None:
                wait = limit.reset_s  # the budget holds requests until then; the gate says so to every caller
            if wait is not None:
                self.pause(wait)
                log.warning("fhir.paused", extra={"status": status, "seconds": round(wait, 3)})

    async def capabilities(self) -> dict[str, Any]:
        resp = await self.request("GET", "metadata", probe=True)
        if not resp.ok or not resp.body or resp.body.get("resourceType") != "CapabilityStatement":
            raise FhirUnavailable(f"metadata answered {resp.status}")
        return resp.body
