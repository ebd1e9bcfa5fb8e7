"""Audit entries: who did what to which NHS number, when, under which TraceID (append-only)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cpis_bridge.core.access import instant
from cpis_bridge.core.principal import Principal


@dataclass(frozen=True, slots=True)
class AuditContext:
    """The request-level facts every audit entry carries. ``via``: the system that acted for the principal (a CDS
    client's token subject when the principal is the clinician named by the hook call)."""

    principal: Principal
    trace_id: str | None = None
    request_id: str | None = None
    via: str | None = None
    session_urid: str | None = None  # NHSD-Session-URID: the user's role profile for this session, as sent

    def entry(self, action: str, nhs: str | None, at: dt.datetime, **detail: Any) -> dict[str, Any]:
        p = self.principal
        out: dict[str, Any] = {
            "at": instant(at),
            "action": action,
            "actor": p.subject,
            "actorName": p.name,
            "roleCode": p.role_code,
            "role": p.role.value,
            "org": p.ods,
            "traceId": self.trace_id,
            "nhsNumber": nhs,
        }
        if self.via is not None:
            out["via"] = self.via
        if p.sds_user_id:
            out["sdsUserId"] = p.sds_user_id
        if self.session_urid:
            out["sessionUrid"] = self.session_urid
        if detail:
            out["detail"] = detail
        return out
