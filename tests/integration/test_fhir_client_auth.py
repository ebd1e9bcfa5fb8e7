"""The FHIR client's authentication against the real aiohttp double's token endpoint: static bearer, OAuth2 client
credentials with a client secret or a private_key_jwt assertion (RS384/ES384/RS512 with kid), caching, refresh."""

from __future__ import annotations

import base64

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cpis_bridge.fhir.client import ClientCredentials, FhirClient, make_auth

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def test_static_bearer(double, session):
    double.token = "static-token"
    good = FhirClient(double.base_url, session, make_auth("bearer", token="static-token"))
    assert (await good.request("GET", "Flag/none")).status == 404
    bad = FhirClient(double.base_url, session, make_auth("bearer", token="wrong"))
    assert (await bad.request("GET", "Flag/none")).status == 401


async def test_client_secret(double, session):
    double.token = "not-yet-issued"
    auth = make_auth(
        "client-secret",
        token_url=f"{double.root}/token",
        client_id="cpis",
        client_secret="s3cret",
        scope="system/Flag.write",
    )
    client = FhirClient(double.base_url, session, auth)
    assert (await client.request("GET", "Flag/none")).status == 404
    assert double.last_token_auth == "Basic " + base64.b64encode(b"cpis:s3cret").decode()
    assert double.last_token_form["scope"] == "system/Flag.write"
    await client.request("GET", "Flag/none")
    assert double.tokens_issued == 1, "the token is cached"


def _key(alg: str, tmp_path):
    if alg.startswith("ES"):
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key.public_key(), path


@pytest.mark.parametrize("alg", ["RS384", "ES384", "RS512"])
async def test_private_key_jwt(double, session, tmp_path, alg):
    public, path = _key(alg, tmp_path)
    double.token = "not-yet-issued"
    token_url = f"{double.root}/token"
    auth = make_auth(
        "private-key-jwt",
        token_url=token_url,
        client_id="cpis-bridge",
        private_key_file=path,
        kid="key-1",
        alg=alg,
        scope="system/Flag.write",
    )
    client = FhirClient(double.base_url, session, auth)
    assert (await client.request("GET", "Flag/none")).status == 404
    form = double.last_token_form
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = form["client_assertion"]
    assert jwt.get_unverified_header(assertion)["kid"] == "key-1"
    claims = jwt.decode(assertion, public, algorithms=[alg], audience=token_url)
    assert claims["iss"] == claims["sub"] == "cpis-bridge"
    assert claims["exp"] - claims["iat"] <= 300 and claims["jti"]


async def test_token_refreshed_before_expiry_and_after_401(double, session):
    now = [1000.0]
    auth = ClientCredentials(f"{double.root}/token", "cpis", client_secret="s", clock=lambda: now[0])
    double.token = "x"
    double.token_ttl = 120
    client = FhirClient(double.base_url, session, auth)
    await client.request("GET", "Flag/none")
    now[0] += 50
    await client.request("GET", "Flag/none")
    assert auth.fetched == 1
    now[0] += 15  # 65 s in: within the 60 s refresh margin of a 120 s token
    await client.request("GET", "Flag/none")
    assert auth.fetched == 2
    double.token = "revoked-on-the-server"
    assert (await client.request("GET", "Flag/none")).status == 404  # 401 -> new token -> retried once
    assert auth.fetched == 3


def test_missing_settings_are_named():
    with pytest.raises(ValueError, match="CPIS_FHIR_AUTH_TOKEN"):
        make_auth("bearer")
    with pytest.raises(ValueError, match="CPIS_FHIR_AUTH_ALG"):
        make_auth(
            "private-key-jwt", token_url="http://127.0.0.1:1/t", client_id="c", private_key_file=__file__, alg="HS256"
        )
