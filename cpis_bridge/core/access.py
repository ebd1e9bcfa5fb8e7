"""Accesses (attendances and unscheduled look-ups): who asked, where, when; their compact stored form and ids."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, overload

from cpis_bridge.core.clock import epoch_ms

# Fixed namespaces (documented in the README): ids derived from them are stable across releases.
NS_ACCESS: Final = uuid.UUID("6f1c2f4e-8a55-5b7e-9d3a-2b7c0c1d4e01")
NS_NOTIFICATION: Final = uuid.UUID("6f1c2f4e-8a55-5b7e-9d3a-2b7c0c1d4e02")
SEP: Final = "\x1f"
HISTORY_LENGTH: Final = 25
_LIMITS: Final = {"user_id": 100, "user_name": 100, "role_code": 32, "source_event_id": 128}


def _clean(value: str | None, limit: int) -> str:
    if not value:
        return ""
    return value.replace(SEP, " ").replace("\x1e", " ")[:limit]


def _from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


@overload
def instant(t: dt.datetime) -> str: ...
@overload
def instant(t: dt.datetime | None) -> str | None: ...
def instant(t: dt.datetime | None) -> str | None:
    """An instant as API output: UTC with millisecond precision and a Z."""
    if t is None:
        return None
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who performed an access: a person (id, name, role code) or, without a person, the calling system."""

    user_id: str
    user_name: str | None = None
    role_code: str | None = None


@dataclass(frozen=True, slots=True)
class Access:
    """One unscheduled access to a flagged child, as kept in the child's history (at most 25, newest first)."""

    care_setting: str  # ODS code; name and type come from the registry
    source_event_id: str
    occurred_at: dt.datetime
    actor: Actor
    arrived_at: dt.datetime | None = None

    def encode(self) -> str:
        """The compact stored form. Lua matches idempotency on the ``ods SEP source_event_id SEP`` prefix."""
        return SEP.join(
            (
                self.care_setting,
                _clean(self.source_event_id, _LIMITS["source_event_id"]),
                str(epoch_ms(self.occurred_at)),
                "" if self.arrived_at is None else str(epoch_ms(self.arrived_at)),
                _clean(self.actor.user_id, _LIMITS["user_id"]),
                _clean(self.actor.user_name, _LIMITS["user_name"]),
                _clean(self.actor.role_code, _LIMITS["role_code"]),
            )
        )

    @property
    def idempotency_prefix(self) -> str:
        return f"{self.care_setting}{SEP}{_clean(self.source_event_id, _LIMITS['source_event_id'])}{SEP}"

    @classmethod
    def decode(cls, text: str) -> Access:
        ods, sid, occurred, arrived, user_id, user_name, role_code = text.split(SEP)
        return cls(
            care_setting=ods,
            source_event_id=sid,
            occurred_at=_from_ms(int(occurred)),
            arrived_at=_from_ms(int(arrived)) if arrived else None,
            actor=Actor(user_id=user_id, user_name=user_name or None, role_code=role_code or None),
        )

    def access_id(self, child_key: str) -> str:
        """A stable id for this access (derived, so it costs no storage)."""
        seed = f"{child_key}|{self.care_setting}|{self.source_event_id}|{epoch_ms(self.occurred_at)}"
        return _uuid5(_NS_ACCESS_BYTES, seed)

    def to_api(self, child_key: str, care_settings: dict[str, tuple[str, str]]) -> dict[str, Any]:
        """The ``access`` shape of docs/contract.md §6. ``care_settings`` maps ODS -> (name, type)."""
        name, kind = care_settings.get(self.care_setting, (self.care_setting, "UNKNOWN"))
        return {
            "id": self.access_id(child_key),
            "occurredAt": instant(self.occurred_at),
            "arrivedAt": instant(self.arrived_at),
            "careSetting": {"ods": self.care_setting, "name": name, "type": kind},
            "user": {"id": self.actor.user_id, "name": self.actor.user_name, "roleCode": self.actor.role_code},
            "sourceEventId": self.source_event_id,
        }


# What decoding or rendering a stored item can raise when it holds a value no current writer produces (an instant
# outside the calendar, a field missing): a reader skips that item, reports it, and goes on with the next.
UNREADABLE: Final = (ValueError, OverflowError, KeyError, TypeError, IndexError, AttributeError)
Unreadable = Callable[[str], None]  # told the kind of item skipped ("access", "record", "notification", ...)


def ignore_unreadable(item: str) -> None:
    """The default report of a skipped item (the app passes one that logs it and counts it in a metric)."""


def readable_accesses(raws: Iterable[str], child_key: str, unreadable: Unreadable) -> list[tuple[str, Access]]:
    """Stored accesses decoded with their ids, in order, without (but reporting) any that cannot be decoded."""
    out: list[tuple[str, Access]] = []
    for raw in raws:
        try:
            access = Access.decode(raw)
            out.append((access.access_id(child_key), access))
        except UNREADABLE:
            unreadable("access")
    return out


def notification_id(access_id: str, la: str) -> str:
    """One notification per (access, LA): its id is stable across retries and processes."""
    return _uuid5(NS_NOTIFICATION_BYTES, f"{access_id}|{la}")


_NS_ACCESS_BYTES: Final = NS_ACCESS.bytes
NS_NOTIFICATION_BYTES: Final = NS_NOTIFICATION.bytes


def _uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))`` without building UUID objects (a hot-path cost per access)."""
    h = bytearray(hashlib.sha1(namespace + name.encode(), usedforsecurity=False).digest()[:16])  # RFC 4122 v5
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def uuid4_text() -> str:
    """``str(uuid.uuid4())`` at under half the cost (no UUID object): ids minted per request."""
    x = os.urandom(16).hex()
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-{'89ab'[int(x[16], 16) & 3]}{x[17:20]}-{x[20:]}"
