"""The test world every suite shares: the test registry and secrets, bearer headers for each kind of principal, and
an LA plan record with invented details (NHS numbers from the 999 test range only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpis_bridge.auth import dev_token
from cpis_bridge.core.principal import Role

DATA = Path(__file__).resolve().parent.parent / "data"
REGISTRY = DATA / "registry.yaml"
DEV_SECRET = "test-dev-secret-not-for-production-0123456789"
HASH_KEY = "test-log-hash-key-0123456789"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"


def token(role: Role | str, ods: str, **kw: Any) -> str:
    return dev_token(DEV_SECRET, role=Role(role), ods=ods, **kw)


def auth(role: Role | str, ods: str, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, ods, **kw)}"}


LA1 = auth(Role.LOCAL_AUTHORITY, "LA001")
LA2 = auth(Role.LOCAL_AUTHORITY, "LA002")
ED = auth(Role.CARE_SETTING, "RXX01", name="Dr Test Example", role_code="R8000")
GP = auth(Role.CARE_SETTING, "GP001")
OPS = auth(Role.OPS, "OPS")


def record(local_id: str = "CASE-1", nhs: str = "9990000018", **kw: Any) -> dict[str, Any]:
    body = {
        "localId": local_id,
        "planType": "CPP",
        "nhsNumber": nhs,
        "dateOfBirth": "2016-04-02",
        "givenName": "Testchild",
        "familyName": "Example",
        "startDate": "2026-01-10",
        "endDate": None,
    }
    body.update(kw)
    return body
