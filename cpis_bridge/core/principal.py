"""Who is calling: the verified identity behind a request, and the roles the service knows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

SDS_USER_PREFIX: Final = "sds:"


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
    sds_user_id: str | None = None  # the person's national SDS user id, when the token carries one

    @property
    def user_ref(self) -> str:
        """The user as accesses record them: ``sds:<SDS user id>`` when known (shown with the national identifier
        system), else the token subject (shown with the service's own user system)."""
        return SDS_USER_PREFIX + self.sds_user_id if self.sds_user_id else self.subject
