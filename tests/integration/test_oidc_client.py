"""The duty view's OpenID Connect client (web/views/oidc.py) against a real provider (oidc-provider-mock, its own
server): a good answer names the person; every check refuses what it should: a replayed code, another attempt's
state, a nonce that is not the attempt's, an attempt too old, the provider's refusal, a person of another council,
a provider that states another issuer. The browser tests walk the same flow through the pages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from cpis_bridge.registry import load_registry
from cpis_bridge.web.views.oidc import OidcSignIns, ProviderUnavailable, SignInFailed
from tests.support.oidc import LA1_SECRET, Provider, registry_with_sign_in

CALLBACK = "http://127.0.0.1:9/la/sign-in/callback"  # never called: the test reads the provider's redirect


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    p = Provider(tmp_path_factory.mktemp("oidc-client") / "provider.log")
    try:
        yield p
    finally:
        p.stop()


def _client(tmp_path: Path, issuer: str) -> OidcSignIns:
    registry = load_registry(registry_with_sign_in(tmp_path, issuer))
    return OidcSignIns(registry, {"LA001_OIDC_SECRET": LA1_SECRET}.get)


async def _answer(oidc: OidcSignIns, sub: str, ods: str = "LA001") -> tuple[dict[str, Any], dict[str, str]]:
    """Start an attempt, sign in at the provider as ``sub``, and return the attempt and the provider's answer."""
    url, pending = await oidc.begin(ods, CALLBACK)
    async with aiohttp.ClientSession() as http, http.post(url, data={"sub": sub}, allow_redirects=False) as r:
        assert r.status in (302, 303), await r.text()
        location = r.headers["Location"]
    assert location.startswith(CALLBACK)
    return pending, dict(parse_qsl(urlsplit(location).query))


async def test_a_good_answer_names_the_person_and_every_check_refuses(provider: Provider, tmp_path: Path) -> None:
    oidc = _client(tmp_path, provider.url)
    sam = provider.person("sam.client@la001.example", name="Sam Client", groups=["cpis-duty-la001"])

    pending, answer = await _answer(oidc, sam)
    person = await oidc.finish(pending, answer)
    assert (person.sub, person.name) == (sam, "Sam Client") and person.id_token.count(".") == 2

    async def refused(pending: dict[str, Any], answer: dict[str, str]) -> str:
        with pytest.raises(SignInFailed) as err:
            await oidc.finish(pending, answer)
        return err.value.reason

    assert await refused(pending, answer) == "token"  # the code was used: the provider will not take it again
    pending, answer = await _answer(oidc, sam)
    _, other = await oidc.begin("LA001", CALLBACK)
    assert await refused(other, answer) == "state"  # an answer to another attempt
    assert await refused(pending, {**answer, "state": ""}) == "state"
    assert await refused({**pending, "nonce": "not-this-attempts"}, answer) == "id-token"
    pending, answer = await _answer(oidc, sam)
    assert await refused({**pending, "at": pending["at"] - 3600}, answer) == "expired"
    assert await refused(pending, {"state": answer["state"], "error": "access_denied"}) == "provider-refused"
    assert await refused({**pending, "ods": "LA999"}, answer) == "no-attempt"

    alex = provider.person("alex.client@la002.example", name="Alex", groups=["cpis-duty-la002"])
    pending, answer = await _answer(oidc, alex)  # signed in at LA001's client, but of the other council
    assert await refused(pending, answer) == "no-la"

    url = await oidc.sign_out_url("LA001", person.id_token, "http://127.0.0.1:9/la/signed-out")
    assert url is not None and url.startswith(provider.url + "/oauth2/end_session?")
    assert "id_token_hint=" in url and "post_logout_redirect_uri=" in url


async def test_a_provider_stating_another_issuer_is_not_used(provider: Provider, tmp_path: Path) -> None:
    # OpenID Connect Discovery: the issuer a provider states must be the one configured
    oidc = _client(tmp_path, provider.url)
    oidc.config["LA001"] = dataclasses.replace(oidc.config["LA001"], issuer=provider.url + "/other")
    with pytest.raises(ProviderUnavailable) as err:
        await oidc.begin("LA001", CALLBACK)
    assert err.value.reason == "provider-issuer-mismatch"
