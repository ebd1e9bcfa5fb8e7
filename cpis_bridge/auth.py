"""Token checking: dev HS256 tokens, production JWTs from a JWKS URL, CDS Hooks client tokens; claims to Principal.

Roles and per-LA isolation are enforced in one place: web.middlewares reads the roles a route allows (``allow``)
and puts the verified Principal on the request; handlers scope every store call by ``principal.ods``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
from jwt import PyJWK

from cpis_bridge.core.errors import Forbidden, Unauthenticated
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.core.registry import Registry

if TYPE_CHECKING:
    from jwt.types import Options  # a TypedDict since PyJWT 2.11: for the checker only

ASYMMETRIC_ALGS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384"})
SIGNING_KEY_TYPES = frozenset({"RSA", "EC"})
DEV_ALG = "HS256"
JWKS_TTL_S = 300.0
JWKS_MIN_REFRESH_S = 10.0
LEEWAY_S = 30
VERIFIED_TTL_S = 300.0
VERIFIED_MAX = 10_000
CDS_MAX_LIFETIME_S = 300  # CDS Hooks: a client token lives at most 5 minutes (exp - iat)
MAX_JTI = 256

# (iss, jti, seconds to remember it) -> True the first time that pair is seen, False on a replay
JtiGuard = Callable[[str, str, int], Awaitable[bool]]
# Real tokens are well under 4 KiB; longer ones are refused before any decoding (the server reads headers up to
# web.server.MAX_FIELD_SIZE so that this, not the HTTP parser, answers them).
MAX_TOKEN_CHARS = 16 * 1024


def dev_token(
    secret: str,
    *,
    role: Role,
    ods: str,
    name: str | None = None,
    role_code: str | None = None,
    ttl_s: int = 3600,
    subject: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A dev token signed with the dev secret (``cpis-bridge token``)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject or f"dev-{role.value}-{ods}",
        "iat": now,
        "exp": now + ttl_s,
        "cpis_role": role.value,
        "ods": ods,
    }
    if name:
        claims["name"] = name
    if role_code:
        claims["role_code"] = role_code
    if extra:
        claims.update(extra)
    return jwt.encode(claims, secret, algorithm=DEV_ALG)


@dataclass
class JwksCache:
    """Keys fetched from a JWKS URL, cached and refreshed on an unknown ``kid`` (at most every 10 s).

    Only RSA and EC signing keys are kept. A key that names its ``alg`` verifies only that algorithm; one that does
    not verifies any accepted algorithm of its type (an RSA key published without ``alg`` serves RS256 and RS384).
    """

    url: str
    session: aiohttp.ClientSession | None = None
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetched_at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _built: dict[tuple[str, str], PyJWK] = field(default_factory=dict)

    async def get(self, kid: str | None, alg: str) -> PyJWK:
        now = time.monotonic()
        stale = now - self.fetched_at > JWKS_TTL_S
        if stale or (kid not in self.keys and now - self.fetched_at > JWKS_MIN_REFRESH_S):
            async with self._lock:
                if time.monotonic() - self.fetched_at > JWKS_MIN_REFRESH_S or not self.keys:
                    await self._fetch()
        if kid is None and len(self.keys) == 1:
            kid = next(iter(self.keys))
        jwk = self.keys.get(kid or "")
        if jwk is None:
            raise Unauthenticated("token signed with an unknown key")
        built = self._built.get((kid or "", alg))
        if built is None:
            declared = jwk.get("alg")
            if declared is not None and declared != alg:
                raise Unauthenticated("token algorithm does not match its key")
            try:
                built = PyJWK(jwk, alg)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                raise Unauthenticated("token algorithm does not match its key") from None
            self._built[(kid or "", alg)] = built
        return built

    async def _fetch(self) -> None:
        session = self.session
        own = session is None
        if own:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        assert session is not None
        try:
            async with session.get(self.url) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            if not self.keys:
                raise Unauthenticated("the token issuer's keys cannot be fetched") from None
            return
        finally:
            if own:
                await session.close()
        keys: dict[str, dict[str, Any]] = {}
        for jwk in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(jwk, dict) or jwk.get("kty") not in SIGNING_KEY_TYPES:
                continue
            if jwk.get("use") not in (None, "sig") or jwk.get("alg") not in (None, *ASYMMETRIC_ALGS):
                continue
            try:
                PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue
            keys[str(jwk.get("kid", ""))] = jwk
        self.keys = keys
        self._built = {}
        self.fetched_at = time.monotonic()


class Authenticator:
    def __init__(
        self,
        registry: Registry,
        *,
        dev_secret: str | None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.registry = registry
        self.dev_secret = dev_secret if not jwks_url else None
        self.issuer = issuer
        self.audience = audience
        self.jwks = JwksCache(jwks_url, session) if jwks_url else None
        self.session = session
        self._cds_jwks: dict[str, JwksCache] = {}
        self._verified: dict[str, tuple[Principal, float]] = {}
        self.jti_guard: JtiGuard | None = None  # set once the store is up; CDS client tokens need it

    @property
    def production(self) -> bool:
        return self.jwks is not None

    async def verify_bearer(self, header: str | None) -> Principal:
        token = _bearer(header)
        cached = self._verified.get(token)
        if cached is not None:
            principal, until = cached
            if time.time() < until:
                return principal
            del self._verified[token]
        principal = await self._verify_bearer(token)
        return principal

    async def _verify_bearer(self, token: str) -> Principal:
        """Verify a bearer token and remember the result until it expires (at most VERIFIED_TTL_S): a signature
        check costs more than the rest of a look-up, and ED systems reuse a token for many requests."""
        alg, kid = _header(token)
        if self.jwks is not None:
            if alg not in ASYMMETRIC_ALGS:
                raise Unauthenticated("token algorithm not accepted")
            key: Any = await self.jwks.get(kid, alg)
            claims = _decode(token, key, alg, issuer=self.issuer, audience=self.audience)
        else:
            if alg != DEV_ALG or not self.dev_secret:
                raise Unauthenticated("token algorithm not accepted")
            claims = _decode(token, self.dev_secret, alg, issuer=self.issuer, audience=self.audience)
        principal = self.principal(claims)
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = (principal, min(float(claims["exp"]), time.time() + VERIFIED_TTL_S))
        return principal

    async def verify_cds(self, header: str | None, audience: str | Sequence[str]) -> Principal:
        """A CDS Hooks 2.0 client token (iss, aud, exp, iat, jti; at most 5 minutes from iat to exp; each jti once per
        issuer), or a dev care-setting token in dev mode."""
        token = _bearer(header)
        alg, kid = _header(token)
        if alg == DEV_ALG and not self.production:
            principal = await self.verify_bearer(header)
            if principal.role is not Role.CARE_SETTING:
                raise Forbidden("CDS Hooks calls need a care-setting token")
            return principal
        if alg not in ASYMMETRIC_ALGS:
            raise Unauthenticated("token algorithm not accepted")
        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            raise Unauthenticated("token is malformed") from None
        client = self.registry.cds_clients.get(iss) if isinstance(iss, str) else None
        if client is None:
            raise Unauthenticated("CDS client not registered")
        cache = self._cds_jwks.setdefault(client.iss, JwksCache(client.jwks_url, self.session))
        key: Any = await cache.get(kid, alg)
        claims = _decode(token, key, alg, issuer=client.iss, audience=audience, required=("exp", "iat", "jti"))
        exp, iat, jti = claims["exp"], claims["iat"], claims["jti"]
        if exp - iat > CDS_MAX_LIFETIME_S:
            raise Unauthenticated("token lifetime is over 5 minutes")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI:
            raise Unauthenticated("token jti is invalid")
        if self.jti_guard is None:
            raise Unauthenticated("token replay cannot be checked")
        if not await self.jti_guard(client.iss, jti, max(1, int(exp - time.time()) + LEEWAY_S)):
            raise Unauthenticated("token already used")
        setting = self.registry.care_settings[client.ods]
        return Principal(
            subject=str(claims.get("sub") or client.iss),
            role=Role.CARE_SETTING,
            ods=setting.ods,
            name=_opt_str(claims.get("name")),
            role_code=_opt_str(claims.get("role_code")),
            client=client.iss,
        )

    def principal(self, claims: dict[str, Any]) -> Principal:
        """Missing claims make the token unusable (401); a role or organisation that is not allowed, 403."""
        raw_role = claims.get("cpis_role")
        if not isinstance(raw_role, str) or not raw_role:
            raise Unauthenticated("token has no cpis_role claim")
        try:
            role = Role(raw_role)
        except ValueError:
            raise Forbidden("token has no valid cpis_role claim") from None
        ods = claims.get("ods")
        if role is Role.OPS:
            ods_text = ods if isinstance(ods, str) else ""
        else:
            if not isinstance(ods, str) or not ods:
                raise Unauthenticated("token has no ods claim")
            known = self.registry.care_settings if role is Role.CARE_SETTING else self.registry.local_authorities
            if ods not in known:
                raise Forbidden("organisation is not registered for this role")
            ods_text = ods
        return Principal(
            subject=str(claims["sub"]),
            role=role,
            ods=ods_text,
            name=_opt_str(claims.get("name")),
            role_code=_opt_str(claims.get("role_code")),
            sds_user_id=_sds_user_id(claims.get("sds_user_id")),
        )


def _sds_user_id(value: object) -> str | None:
    """The ``sds_user_id`` claim (the national SDS user id: digits) or None; anything else is ignored."""
    return value if isinstance(value, str) and value.isdigit() and len(value) <= 20 else None


def _opt_str(value: object) -> str | None:
    return value[:100] if isinstance(value, str) and value else None


def _bearer(header: str | None) -> str:
    if not header:
        raise Unauthenticated("missing bearer token")
    if len(header) > MAX_TOKEN_CHARS:
        raise Unauthenticated("bearer token too long")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing bearer token")
    return token.strip()


def _header(token: str) -> tuple[str, str | None]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthenticated("token is malformed") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise Unauthenticated("token algorithm not accepted")
    kid = header.get("kid")
    return alg, kid if isinstance(kid, str) else None


def _decode(
    token: str,
    key: Any,
    alg: str,
    *,
    issuer: str | None,
    audience: str | Sequence[str] | None,
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    options: Options = {"require": ["exp", "sub", *required] if not required else ["exp", *required]}
    if audience is None:
        options["verify_aud"] = False
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            issuer=issuer,
            audience=audience,
            options=options,
            leeway=dt.timedelta(seconds=LEEWAY_S),
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired") from None
    except jwt.PyJWTError:
        raise Unauthenticated("token is invalid") from None
    sub = claims.get("sub")
    if not required and not (isinstance(sub, str) and sub.strip()):
        raise Unauthenticated("token has no subject")
    return claims
