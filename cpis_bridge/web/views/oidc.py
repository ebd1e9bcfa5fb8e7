"""OpenID Connect sign-in for the web views, per LA (the registry's ``signIn``): authlib as the client, the
authorization code flow with PKCE (S256), a state and a nonce per attempt; the ID token's signature (the provider's
JWKS), issuer, audience, nonce and lifetime are checked, then the LA's claim mapping. RP-initiated sign-out."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.base_client import BaseApp
from authlib.integrations.base_client.async_app import AsyncOAuth2Mixin
from authlib.integrations.base_client.async_openid import AsyncOpenIDMixin
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc.errors import JoseError

from cpis_bridge.core.registry import OidcSignIn, Registry
from cpis_bridge.registry import sign_in_secret, sign_in_secret_problems

log = logging.getLogger(__name__)

ATTEMPT_S = 600  # an attempt (redirect to the provider and back) must finish within this
TIMEOUT_S = 10.0  # one call to the provider (discovery, token, JWKS)


class _Client(AsyncOAuth2Mixin, AsyncOpenIDMixin, BaseApp):  # type: ignore[misc]  # authlib has no type hints: Any bases
    """authlib's framework-neutral OAuth 2 + OpenID client (what its Starlette integration builds on), over httpx."""

    client_cls = AsyncOAuth2Client


class SignInFailed(Exception):
    """A sign-in attempt that did not end in a person of the LA; ``reason`` is a short code for the audit trail and
    the metric (never a claim value or a name)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ProviderUnavailable(SignInFailed):
    """The LA's provider could not be reached or described itself wrongly (not the person's fault)."""


@dataclass(frozen=True, slots=True)
class Person:
    """Who signed in: the provider's subject, a display name and the ID token (kept for sign-out)."""

    sub: str
    name: str
    id_token: str


class OidcSignIns:
    """One client per LA with ``signIn``. Secrets are read once, at start-up; a missing one stops the start."""

    def __init__(self, registry: Registry, env: Callable[[str], str | None]) -> None:
        problems = sign_in_secret_problems(registry, env)
        if problems:
            raise RuntimeError("; ".join(problems))
        self.config: dict[str, OidcSignIn] = {}
        self._clients: dict[str, _Client] = {}
        for la in registry.local_authorities.values():
            if la.sign_in is None:
                continue
            self.config[la.ods] = la.sign_in
            self._clients[la.ods] = _Client(
                framework=None,
                name=la.ods,
                client_id=la.sign_in.client_id,
                client_secret=sign_in_secret(la.sign_in, env),
                server_metadata_url=f"{la.sign_in.issuer}/.well-known/openid-configuration",
                client_kwargs={
                    "scope": " ".join(la.sign_in.scopes),
                    "code_challenge_method": "S256",
                    "timeout": TIMEOUT_S,
                },
            )

    def origins(self) -> tuple[str, ...]:
        """The providers' origins (scheme://host[:port]): the sign-in and sign-out forms redirect there."""
        out = set()
        for config in self.config.values():
            parts = urlsplit(config.issuer)
            out.add(f"{parts.scheme}://{parts.netloc}")
        return tuple(sorted(out))

    def offered(self, ods: str) -> bool:
        return ods in self._clients

    async def _metadata(self, ods: str) -> dict[str, Any]:
        client = self._clients[ods]
        try:
            metadata: dict[str, Any] = await client.load_server_metadata()
        except (httpx2.HTTPError, ValueError) as exc:
            raise ProviderUnavailable("provider-unreachable", type(exc).__name__) from None
        if metadata.get("issuer", "").rstrip("/") != self.config[ods].issuer:
            # OpenID Connect Discovery 1.0 section 4.3: the issuer it states must be the one configured
            client.server_metadata.clear()
            raise ProviderUnavailable("provider-issuer-mismatch")
        return metadata

    async def begin(self, ods: str, redirect_uri: str) -> tuple[str, dict[str, Any]]:
        """The provider's authorization URL for a new attempt, and what to keep (server-side) until it returns."""
        await self._metadata(ods)
        made = await self._clients[ods].create_authorization_url(redirect_uri)
        pending = {
            "ods": ods,
            "state": made["state"],
            "nonce": made["nonce"],
            "verifier": made["code_verifier"],
            "redirect_uri": redirect_uri,
            "at": time.time(),
        }
        return str(made["url"]), pending

    async def finish(self, pending: dict[str, Any], query: dict[str, str]) -> Person:
        """The person the provider's answer names, after every check; SignInFailed otherwise."""
        ods = str(pending.get("ods", ""))
        if ods not in self._clients:
            raise SignInFailed("no-attempt")
        if query.get("error"):
            raise SignInFailed("provider-refused", query["error"][:40])
        state = query.get("state", "")
        if not state or not hmac.compare_digest(state.encode(), str(pending.get("state", "")).encode()):
            raise SignInFailed("state")
        if time.time() - float(pending.get("at", 0)) > ATTEMPT_S:
            raise SignInFailed("expired")
        code = query.get("code")
        if not code:
            raise SignInFailed("no-code")
        config, client = self.config[ods], self._clients[ods]
        await self._metadata(ods)
        try:
            token = await client.fetch_access_token(
                redirect_uri=pending["redirect_uri"], code=code, code_verifier=pending["verifier"]
            )
        except httpx2.HTTPError as exc:
            raise ProviderUnavailable("provider-unreachable", type(exc).__name__) from None
        except (AuthlibBaseError, ValueError, KeyError) as exc:
            raise SignInFailed("token", type(exc).__name__) from None
        if not isinstance(token, dict) or not isinstance(token.get("id_token"), str):
            raise SignInFailed("id-token", "missing")
        try:
            claims = await client.parse_id_token(
                token,
                nonce=pending["nonce"],
                claims_options={
                    "iss": {"essential": True, "value": config.issuer},
                    "aud": {"essential": True, "value": config.client_id},
                    "sub": {"essential": True},
                    "nonce": {"essential": True, "value": pending["nonce"]},
                },
                leeway=60,
            )
        except httpx2.HTTPError as exc:
            raise ProviderUnavailable("provider-unreachable", type(exc).__name__) from None
        except (JoseError, AuthlibBaseError, ValueError, KeyError, TypeError) as exc:
            raise SignInFailed("id-token", type(exc).__name__) from None
        if not config.admits(claims):
            raise SignInFailed("no-la")
        sub = str(claims["sub"])
        name = next(
            (str(claims[k]) for k in ("name", "preferred_username", "email") if isinstance(claims.get(k), str)), sub
        )
        return Person(sub=sub, name=" ".join(name.split())[:100], id_token=token["id_token"])

    async def sign_out_url(self, ods: str, id_token: str, after: str) -> str | None:
        """Where to send the browser to end the provider's session too (RP-initiated logout), when it offers it."""
        if ods not in self._clients:
            return None
        try:
            metadata = await self._metadata(ods)
        except ProviderUnavailable:
            return None
        if not metadata.get("end_session_endpoint"):
            return None
        made = await self._clients[ods].create_logout_url(
            post_logout_redirect_uri=after, id_token_hint=id_token, client_id=self.config[ods].client_id
        )
        return str(made["url"])
