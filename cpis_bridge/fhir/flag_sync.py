"""The Flag a record is mirrored as on the sync server: ids, identifier, status, which of several to keep, and
the pure record -> Flag mapping. No I/O here."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Final

from cpis_bridge.core.ports import FlagStatus
from cpis_bridge.core.records import Record, VisibilityWindows
from cpis_bridge.fhir import mapping

#: Flag ids and the identifier system are shared with the ED API's Flags (fhir/mapping.py): one record, one Flag.
FLAG_NAMESPACE: Final = mapping.NS_FLAG
IDENTIFIER_SYSTEM: Final = mapping.RECORD_ID
UKCORE_FLAG: Final = mapping.UKCORE_FLAG

ACTIVE: Final = FlagStatus.ACTIVE
INACTIVE: Final = FlagStatus.INACTIVE
ENTERED_IN_ERROR: Final = FlagStatus.ENTERED_IN_ERROR
record_key = mapping.record_key


def flag_id(la: str, local_id: str) -> str:
    """UUIDv5 of (LA ODS code, localId) under FLAG_NAMESPACE."""
    return str(uuid.uuid5(FLAG_NAMESPACE, record_key(la, local_id)))


def flag_status(record: Record, day: dt.date, windows: VisibilityWindows) -> FlagStatus:
    """active while the record is visible on ``day``, inactive after (erasure is decided by the caller)."""
    return ACTIVE if record.is_visible(day, windows) else INACTIVE


def record_flag(record: Record, status: str) -> dict[str, Any]:
    """The R4 Flag (plain JSON dict) for ``record`` with ``status``: the ED API's Flag, declaring only UK Core."""
    flag = mapping.flag(record, None)
    flag["status"] = status
    flag["meta"] = {"profile": [UKCORE_FLAG]}
    return flag


def conditional_url(la: str, local_id: str) -> str:
    """The conditional-update target ``Flag?identifier=system|value`` (URL-encoded value)."""
    from urllib.parse import quote

    return f"Flag?identifier={quote(IDENTIFIER_SYSTEM, safe='')}%7C{quote(record_key(la, local_id), safe='')}"


def summary(flag: dict[str, Any]) -> tuple[Any, ...]:
    """What reconcile compares between the store's Flag and the server's: status, period, subject, code, author."""
    period = flag.get("period") or {}
    subject = ((flag.get("subject") or {}).get("identifier") or {}).get("value")
    codes = tuple(sorted(c.get("code", "") for c in (flag.get("code") or {}).get("coding", [])))
    author = ((flag.get("author") or {}).get("identifier") or {}).get("value")
    return (flag.get("status"), period.get("start"), period.get("end"), subject, codes, author)


def our_key(flag: dict[str, Any]) -> str | None:
    """The readable key of a server Flag carrying our identifier system, else None."""
    for ident in flag.get("identifier") or []:
        if ident.get("system") == IDENTIFIER_SYSTEM and isinstance(ident.get("value"), str):
            return str(ident["value"])
    return None


def _newness(flag: dict[str, Any]) -> tuple[str, int]:
    meta = flag.get("meta") or {}
    try:
        version = int(meta.get("versionId") or 0)
    except (TypeError, ValueError):
        version = 0
    return (str(meta.get("lastUpdated") or ""), version)


def keep_flag(flags: list[dict[str, Any]], uuid_id: str) -> dict[str, Any]:
    """Of several server Flags for one record, the one to keep: the one with our UUIDv5 id if present, else the
    newest live one (meta.lastUpdated, then versionId), else the newest."""
    for flag in flags:
        if flag.get("id") == uuid_id:
            return flag
    live = [f for f in flags if f.get("status") != ENTERED_IN_ERROR]
    return max(live or flags, key=_newness)
