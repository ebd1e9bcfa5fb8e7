"""Who is calling: the verified identity behind a request, and the roles the service knows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    CARE_SETTING = "care-setting"
    LOCAL_AUTHORITY = "local-authority"
    OPS = "ops"


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. ``ods`` is the organisation (checked against the registry for care settings and LAs);
    ``client`` the registered CDS client (its ``iss``) whose token this was, if any."""

    subject: str
    role: Role
    ods: str
    name: str | None = None
    role_code: str | None = None
    client: str | None = None
