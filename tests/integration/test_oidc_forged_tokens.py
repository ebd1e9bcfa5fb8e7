"""The duty view's OpenID Connect client (web/views/oidc.py) refuses a forged ID token: one signed by a key the
provider's JWKS does not hold, one for another client (audience), one from another issuer, one unsigned. The provider
is a real server (tests/support/forged_oidc.py) whose token endpoint answers with the token the test made; a good
token from it is accepted, so each refusal is the check's, not the double's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import RSAKey

from cpis_bridge.registry import load_registry
from cpis_bridge.web.views.oidc import OidcSignIns, SignInFailed
from tests.support.forged_oidc import KID, ForgedProvider
from tests.support.oidc import LA1_SECRET, registry_with_sign_in

CALLBACK = "http://127.0.0.1:9/la/sign-in/callback"


@pytest.fixture
async def provider() -> AsyncIterator[ForgedProvider]:
    p = ForgedProvider()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def test_forged_id_tokens_are_refused_and_a_good_one_is_accepted(
    provider: ForgedProvider, tmp_path: Path
) -> None:
    oidc = OidcSignIns(
        load_registry(registry_with_sign_in(tmp_path, provider.url)), {"LA001_OIDC_SECRET": LA1_SECRET}.get
    )

    async def callback(**override: Any) -> Any:
        """Start an attempt, have the provider answer the code with a token of these claims, run the callback."""
        key = override.pop("key", None)
        _, pending = await oidc.begin("LA001", CALLBACK)
        claims = {
            "iss": provider.url,
            "aud": "cpis-la001",
            "sub": "sam.forged@la001.example",
            "nonce": pending["nonce"],
            "name": "Sam Forged",
            "groups": ["cpis-duty-la001"],
            **override,
        }
        provider.id_token = provider.token(claims, key=key)
        return await oidc.finish(pending, {"state": pending["state"], "code": "code-1"})

    async def refused(**override: Any) -> str:
        with pytest.raises(SignInFailed) as err:
            await callback(**override)
        return err.value.reason

    person = await callback()
    assert (person.sub, person.name) == ("sam.forged@la001.example", "Sam Forged")
    assert provider.token_requests[-1]["code"] == "code-1"

    stranger = RSAKey.generate_key(2048, parameters={"kid": KID})  # same kid, a key the JWKS does not hold
    assert await refused(key=stranger) == "id-token"
    assert await refused(aud="cpis-la002") == "id-token"
    assert await refused(aud=["cpis-someone-else"]) == "id-token"
    assert await refused(iss="http://127.0.0.1:9/another-issuer") == "id-token"
    assert await refused(nonce="another-attempts") == "id-token"
    assert await refused(exp=1_000_000, iat=999_000) == "id-token"  # long expired

    _, body, _ = provider.token({"iss": provider.url}).split(".")
    provider.id_token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + body + "."  # {"alg":"none"}: no signature at all
    _, pending = await oidc.begin("LA001", CALLBACK)
    with pytest.raises(SignInFailed) as err:
        await oidc.finish(pending, {"state": pending["state"], "code": "code-2"})
    assert err.value.reason == "id-token"
