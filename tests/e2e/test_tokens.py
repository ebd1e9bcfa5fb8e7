"""Tampered and unacceptable tokens answer 401 (dev HS256 mode and production JWKS mode); wrong role or unregistered
organisation 403. Production mode verifies against a real JWKS server on loopback with locally generated keys."""

from __future__ import annotations

import base64
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import jwt
import jwt.warnings
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cpis_bridge.app import create_app
from cpis_bridge.config import Settings
from tests.support.world import DEV_SECRET

PATH = "/v1/records?nhsNumber=9990000018"
ISSUER = "https://idp.test.example"
AUDIENCE = "cpis-bridge-test"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "sub": "user-1",
        "iat": now,
        "exp": now + 600,
        "cpis_role": "local-authority",
        "ods": "LA001",
        "iss": ISSUER,
        "aud": AUDIENCE,
    }
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def expect(client: Any, headers: dict[str, str], status: int) -> None:
    r = await client.get(PATH, headers=headers)
    assert r.status == status, await r.text()
    if status >= 400:
        assert r.content_type == "application/problem+json"
        body = await r.json()
        assert body["status"] == status


def _quiet_hs384() -> str:
    with warnings.catch_warnings():
        # PyJWT 2.11 warns about a short HMAC key (the dev secret is one on purpose); older releases do not
        warnings.simplefilter("ignore", getattr(jwt.warnings, "InsecureKeyLengthWarning", UserWarning))
        return jwt.encode(claims(), DEV_SECRET, algorithm="HS384")


# -- dev mode (HS256 with the dev secret) ----------------------------------------------------------------------


async def test_dev_token_accepted(client: Any) -> None:
    await expect(client, bearer(jwt.encode(claims(), DEV_SECRET, algorithm="HS256")), 200)


@pytest.mark.parametrize(
    "name, token",
    [
        ("alg none", unsigned(claims())),
        ("alg None", unsigned(claims(), alg="None")),
        ("alg none with a signature", unsigned(claims()) + "c2ln"),
        ("wrong key", jwt.encode(claims(), "another-secret-of-sufficient-length-0123456789", algorithm="HS256")),
        ("expired", jwt.encode(claims(exp=int(time.time()) - 3600), DEV_SECRET, algorithm="HS256")),
        ("no exp", jwt.encode(claims(exp=None), DEV_SECRET, algorithm="HS256")),
        ("no sub", jwt.encode(claims(sub=None), DEV_SECRET, algorithm="HS256")),
        ("empty sub", jwt.encode(claims(sub=""), DEV_SECRET, algorithm="HS256")),
        ("sub not a string", jwt.encode(claims(sub=42), DEV_SECRET, algorithm="HS256")),
        ("exp not a number", jwt.encode(claims(exp="tomorrow"), DEV_SECRET, algorithm="HS256")),
        ("not yet valid", jwt.encode(claims(nbf=int(time.time()) + 3600), DEV_SECRET, algorithm="HS256")),
        ("HS384 with the dev secret", _quiet_hs384()),
        ("payload edited after signing", None),
        ("garbage", "not-a-jwt"),
        ("two parts", "abc.def"),
        ("bad base64", "!!!.???.***"),
    ],
)
async def test_dev_mode_rejects(client: Any, name: str, token: str | None) -> None:
    if token is None:
        good = jwt.encode(claims(), DEV_SECRET, algorithm="HS256")
        header, _, signature = good.split(".")
        token = f"{header}.{b64(json.dumps(claims(ods='LA002')).encode())}.{signature}"
    await expect(client, bearer(token), 401)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Token abc"},
    ],
)
async def test_missing_bearer(client: Any, headers: dict[str, str]) -> None:
    await expect(client, headers, 401)


@pytest.mark.parametrize(
    "over",
    [{"ods": "LA999"}, {"cpis_role": "ops"}, {"cpis_role": "care-setting", "ods": "RXX01"}, {"cpis_role": "admin"}],
)
async def test_valid_token_wrong_role_or_organisation(client: Any, over: dict[str, Any]) -> None:
    await expect(client, bearer(jwt.encode(claims(**over), DEV_SECRET, algorithm="HS256")), 403)


@pytest.mark.parametrize(
    "over",
    [
        {"ods": None},
        {"ods": ""},
        {"ods": ["LA001"]},
        {"cpis_role": None},
        {"cpis_role": ""},
        {"cpis_role": 7},
        {"cpis_role": "care-setting", "ods": None},
    ],
)
async def test_token_missing_role_or_organisation_claim_is_unauthenticated(client: Any, over: dict[str, Any]) -> None:
    await expect(client, bearer(jwt.encode(claims(**over), DEV_SECRET, algorithm="HS256")), 401)


@pytest.mark.parametrize(
    "path", [PATH, "/fhir/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018"]
)
async def test_a_100_kb_token_is_refused_as_401_without_echo(client: Any, path: str) -> None:
    """Read in full by the server (not cut off by the HTTP parser's 400) and refused before decoding."""
    token = jwt.encode(claims(padding="9990000018" * 7_600), DEV_SECRET, algorithm="HS256")
    assert 100_000 < len(token) < 110_000
    r = await client.get(path, headers=bearer(token))
    text = await r.text()
    assert r.status == 401, text[:300]
    assert r.content_type in ("application/problem+json", "application/fhir+json")
    assert "9990000018" not in text and token[:40] not in text and len(text) < 2000


async def test_dev_mode_checks_issuer_and_audience_when_configured(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(auth_issuer=ISSUER, auth_audience=AUDIENCE)))
    await expect(client, bearer(jwt.encode(claims(), DEV_SECRET, algorithm="HS256")), 200)
    await expect(client, bearer(jwt.encode(claims(iss="https://evil.example"), DEV_SECRET, algorithm="HS256")), 401)
    await expect(client, bearer(jwt.encode(claims(aud="someone-else"), DEV_SECRET, algorithm="HS256")), 401)
    await expect(client, bearer(jwt.encode(claims(aud=None), DEV_SECRET, algorithm="HS256")), 401)


# -- production mode (asymmetric keys from a JWKS URL) -----------------------------------------------------------


class Keys:
    """Locally generated signing keys and the JWKS that publishes their public halves."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_plain = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        rs = {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa-1", "use": "sig", "alg": "RS256"}
        rs384 = {
            **RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True),
            "kid": "rsa-1-384",
            "use": "sig",
            "alg": "RS384",
        }
        plain = {**RSAAlgorithm.to_jwk(self.rsa_plain.public_key(), as_dict=True), "kid": "rsa-noalg"}
        es = {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": "ec-1", "use": "sig", "alg": "ES256"}
        return {"keys": [rs, rs384, plain, es]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
async def prod(aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings], keys: Keys) -> Any:
    hits: list[str] = []

    async def jwks(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response(keys.jwks())

    idp = web.Application()
    idp.router.add_get("/.well-known/jwks.json", jwks)
    server = await aiohttp_server(idp)
    settings = make_settings(
        auth_jwks_url=str(server.make_url("/.well-known/jwks.json")), auth_issuer=ISSUER, auth_audience=AUDIENCE
    )
    assert not settings.dev_mode
    client = await aiohttp_client(create_app(settings))
    client.jwks_hits = hits
    return client


def signed(key: Any, alg: str, kid: str | None, **over: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**over), key, algorithm=alg, headers=headers)


@pytest.mark.parametrize(
    "alg, kid, which",
    [
        ("RS256", "rsa-1", "rsa"),
        ("RS384", "rsa-1-384", "rsa"),
        ("ES256", "ec-1", "ec"),
        ("RS384", "rsa-noalg", "rsa_plain"),
        ("RS256", "rsa-noalg", "rsa_plain"),
        ("RS512", "rsa-noalg", "rsa_plain"),
    ],
)
async def test_production_accepts_asymmetric_tokens(prod: Any, keys: Keys, alg: str, kid: str, which: str) -> None:
    await expect(prod, bearer(signed(getattr(keys, which), alg, kid)), 200)
    assert prod.jwks_hits  # really fetched from the JWKS server


async def test_production_rejects(prod: Any, keys: Keys) -> None:
    rsa_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    rejected = {
        "dev HS256 token": jwt.encode(claims(), DEV_SECRET, algorithm="HS256"),
        "HS256 keyed with the public key": _hmac_token(rsa_pem, "rsa-1"),
        "alg none": unsigned(claims()),
        "wrong key, known kid": signed(keys.intruder, "RS256", "rsa-1"),
        "unknown kid": signed(keys.intruder, "RS256", "intruder"),
        "wrong issuer": signed(keys.rsa, "RS256", "rsa-1", iss="https://evil.example"),
        "no issuer": signed(keys.rsa, "RS256", "rsa-1", iss=None),
        "wrong audience": signed(keys.rsa, "RS256", "rsa-1", aud="someone-else"),
        "no audience": signed(keys.rsa, "RS256", "rsa-1", aud=None),
        "expired": signed(keys.rsa, "RS256", "rsa-1", exp=now - 3600),
        "no exp": signed(keys.rsa, "RS256", "rsa-1", exp=None),
        "no sub": signed(keys.rsa, "RS256", "rsa-1", sub=None),
        "RS384 on a key published for RS256": signed(keys.rsa, "RS384", "rsa-1"),
        "ES256 header on an RSA key": _relabelled(signed(keys.rsa, "RS256", "rsa-1"), "ES256"),
        "RSA signature on the EC key": signed(keys.rsa, "RS256", "ec-1"),
    }
    for name, token in rejected.items():
        r = await prod.get(PATH, headers=bearer(token))
        assert r.status == 401, f"{name}: {r.status} {await r.text()}"
    r = await prod.get(PATH, headers=bearer(signed(keys.rsa, "RS256", "rsa-1", ods="LA999")))
    assert r.status == 403
    r = await prod.get(PATH, headers=bearer(signed(keys.ec, "ES256", "ec-1", cpis_role="care-setting", ods="RXX01")))
    assert r.status == 403
    assert len(prod.jwks_hits) <= 2  # an unknown kid does not make every request refetch the keys


def _hmac_token(secret: bytes, kid: str) -> str:
    """HS256 signed with the RSA public key's PEM: the classic algorithm-confusion attack."""
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps(claims()).encode())
    sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


def _relabelled(token: str, alg: str) -> str:
    header, payload, sig = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    decoded["alg"] = alg
    return f"{b64(json.dumps(decoded).encode())}.{payload}.{sig}"


def test_production_without_audience_refuses_to_start(make_settings: Callable[..., Settings]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="CPIS_AUTH_AUDIENCE is required"):
        make_settings(auth_jwks_url="https://idp.test.example/jwks.json", auth_issuer=ISSUER)


def test_serve_without_audience_exits_with_a_configuration_error(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CPIS_")}
    env.update(
        {
            "CPIS_AUTH_JWKS_URL": "https://idp.test.example/jwks.json",
            "CPIS_AUTH_ISSUER": ISSUER,
            "CPIS_REDIS_URL": "redis://127.0.0.1:9/0",
            "CPIS_DATA_DIR": str(tmp_path),
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "cpis_bridge", "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2
    assert "CPIS_AUTH_AUDIENCE is required" in out.stderr and "Traceback" not in out.stderr


async def test_production_refuses_embedded_redis_without_opt_in(make_settings: Callable[..., Settings]) -> None:
    from cpis_bridge.app import ConfigurationError

    settings = make_settings(
        redis_url=None, auth_jwks_url="http://127.0.0.1:9/jwks.json", auth_issuer=ISSUER, auth_audience=AUDIENCE
    )
    with pytest.raises(ConfigurationError):
        create_app(settings)
