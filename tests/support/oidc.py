"""A real OpenID Connect provider for tests (`oidc-provider-mock` run as its own server on a free port) and the
test registry with each council signing in there."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.support.polling import free_port
from tests.support.world import REGISTRY

LA1_SECRET = "la001-client-secret-for-tests"


class Provider:
    """`python -m oidc_provider_mock` on a free port: a real OpenID Connect provider (discovery, JWKS, RS256 ID
    tokens, nonce required); people are given their claims through its /users API."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oidc_provider_mock", "--port", str(self.port), "--require-nonce"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the provider exited"
            try:
                with urllib.request.urlopen(self.url + "/.well-known/openid-configuration", timeout=2) as r:
                    if json.load(r)["issuer"] == self.url:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the OpenID provider did not start")

    def person(self, sub: str, **claims: object) -> str:
        req = urllib.request.Request(
            f"{self.url}/users/{urllib.parse.quote(sub)}",
            data=json.dumps(claims).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 204
        return sub

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def registry_with_sign_in(tmp: Path, issuer: str) -> Path:
    """The test registry with each council signing in at the provider: LA001's secret from the environment,
    LA002's from a file; each council's people carry its own group."""
    doc = yaml.safe_load(REGISTRY.read_text())
    secret_file = tmp / "la002-oidc-secret"
    secret_file.write_text("la002-client-secret-for-tests\n")
    for la, extra in zip(
        doc["localAuthorities"],
        ({"clientSecretEnv": "LA001_OIDC_SECRET"}, {"clientSecretFile": str(secret_file)}),
        strict=True,
    ):
        ods = la["ods"].lower()
        la["signIn"] = {
            "issuer": issuer,
            "clientId": f"cpis-{ods}",
            "claim": "groups",
            "value": f"cpis-duty-{ods}",
            **extra,
        }
    path = tmp / "registry.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
