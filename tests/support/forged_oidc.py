"""A tiny OpenID Connect provider double for tests that need a bad ID token (a real aiohttp server on a free port):
discovery, a JWKS holding one RSA key, and a token endpoint answering with whatever ID token the test forged
(`ForgedProvider.token(...)` signs claims with the published key or with another one). oidc-provider-mock only ever
signs good tokens; this one lets the sign-in callback be shown refusing the bad ones."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey

KID = "forged-provider-key"


class ForgedProvider:
    """Start with ``await start()``, stop with ``await stop()``. ``id_token`` is what the token endpoint answers."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": KID, "use": "sig", "alg": "RS256"})
        self.id_token = ""
        self.url = ""
        self.token_requests: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None

    def token(self, claims: dict[str, Any], *, key: RSAKey | None = None) -> str:
        """An RS256 JWT of ``claims`` (with iat/exp added unless given), signed by ``key`` (default: the published
        one) and naming the published key's kid either way."""
        now = int(time.time())
        body = {"iat": now, "exp": now + 300, **claims}
        return jwt.encode({"alg": "RS256", "kid": KID}, body, key or self.key)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.url,
                "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token",
                "jwks_uri": self.url + "/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self.key.as_dict(private=False)]})

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests.append(dict(await request.post()))  # type: ignore[arg-type]
        return web.json_response(
            {"access_token": uuid.uuid4().hex, "token_type": "Bearer", "expires_in": 300, "id_token": self.id_token}
        )
