"""The registry's per-council sign-in (signIn): validated at load (https issuer, one secret source that is never
the secret itself, openid scope), and the claim mapping that says a person belongs to the council."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cpis_bridge.core.registry import OidcSignIn
from cpis_bridge.registry import RegistryError, load_registry, sign_in_secret

LA = {"ods": "LA001", "name": "Example Council", "officeHoursPhone": "0300 000 0001", "emergencyDutyPhone": "0300"}
GOOD = {
    "issuer": "https://login.la001.example/",
    "clientId": "cpis",
    "clientSecretEnv": "LA001_OIDC",
    "claim": "groups",
    "value": "cpis-duty",
}


def _load(tmp_path: Path, sign_in: dict[str, object]) -> OidcSignIn | None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"localAuthorities": [{**LA, "signIn": sign_in}]}))
    return load_registry(path).local_authorities["LA001"].sign_in


def test_a_sign_in_is_loaded(tmp_path: Path) -> None:
    got = _load(tmp_path, GOOD)
    assert got == OidcSignIn("https://login.la001.example", "cpis", "groups", "cpis-duty", "LA001_OIDC")
    assert got.scopes == ("openid", "profile")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"issuer": "http://login.la001.example"}, "issuer must be an https URL"),
        ({"issuer": "not a url"}, "not an http"),
        ({"clientSecretFile": "/run/secrets/x"}, "exactly one of clientSecretEnv and clientSecretFile"),
        ({"clientSecretEnv": None}, "exactly one of"),
        ({"clientSecret": "s3cret"}, "clientSecret"),
        ({"scopes": ["profile"]}, "scopes must include openid"),
        ({"claim": ""}, "claim"),
    ],
)
def test_a_bad_sign_in_is_refused_naming_the_field(tmp_path: Path, change: dict[str, object], message: str) -> None:
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(RegistryError, match=message) as err:
        _load(tmp_path, bad)
    assert "local authority #1 (LA001), field signIn" in str(err.value)


def test_http_is_allowed_on_this_machine_only(tmp_path: Path) -> None:
    got = _load(tmp_path, {**GOOD, "issuer": "http://127.0.0.1:9400"})
    assert got is not None and got.issuer == "http://127.0.0.1:9400"


def test_the_secret_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    env = OidcSignIn("https://i", "c", "groups", "v", client_secret_env="X")
    assert sign_in_secret(env, {"X": "s1"}.get) == "s1" and sign_in_secret(env, {}.get) is None
    (tmp_path / "secret").write_text("s2\n")
    file = OidcSignIn("https://i", "c", "groups", "v", client_secret_file=str(tmp_path / "secret"))
    assert sign_in_secret(file, {}.get) == "s2"
    missing = OidcSignIn("https://i", "c", "groups", "v", client_secret_file=str(tmp_path / "absent"))
    assert sign_in_secret(missing, {}.get) is None


@pytest.mark.parametrize(
    ("claims", "admitted"),
    [
        ({"groups": "cpis-duty"}, True),
        ({"groups": ["staff", "cpis-duty"]}, True),
        ({"groups": ["staff"]}, False),
        ({"groups": "cpis-duty-other"}, False),
        ({"groups": [["cpis-duty"]]}, False),
        ({"groups": {"cpis-duty": True}}, False),
        ({}, False),
        ({"other": "cpis-duty"}, False),
    ],
)
def test_the_claim_maps_a_person_to_the_council(claims: dict[str, object], admitted: bool) -> None:
    assert OidcSignIn("https://i", "c", "groups", "cpis-duty", "X").admits(claims) is admitted
