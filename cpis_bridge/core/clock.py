"""Time, in one place: the clock seam services take (``Clock``, ``EpochClock``; the real clock unless a test injects
one it can move), the current instant (UTC), the Europe/London calendar day, and the epoch that the stored day
numbers and millisecond stamps count from (Lua scripts compare the same numbers)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Final, Protocol
from zoneinfo import ZoneInfo

LONDON: Final = ZoneInfo("Europe/London")
EPOCH: Final = dt.date(1970, 1, 1)
DAY_MS: Final = 86_400_000


class Clock(Protocol):
    """What services ask for the current instant (timezone-aware, UTC)."""

    def __call__(self) -> dt.datetime: ...


class EpochClock(Protocol):
    """The current instant in seconds since the epoch (the delivery relay's unit)."""

    def __call__(self) -> float: ...


def utc_now() -> dt.datetime:
    """The current instant, timezone-aware in UTC (the default of every injectable clock)."""
    return dt.datetime.now(dt.UTC)


def epoch_s() -> float:
    """The current instant in epoch seconds (the default EpochClock)."""
    return time.time()


def epoch_ms(t: dt.datetime) -> int:
    """Milliseconds since the Unix epoch of an aware instant."""
    return int(t.timestamp() * 1000)


def epoch_day(day: dt.date) -> int:
    """Days since 1970-01-01 of a calendar day (the day numbers the store and its scripts keep)."""
    return (day - EPOCH).days


def from_epoch_day(n: int) -> dt.date:
    return EPOCH + dt.timedelta(days=n)


def today_london(now: dt.datetime | None = None) -> dt.date:
    """The Europe/London calendar day at ``now`` (default: the current instant)."""
    now = now or utc_now()
    return now.astimezone(LONDON).date()


def london_midnight_ms(day: dt.date) -> int:
    """The epoch ms at which ``day`` starts in Europe/London."""
    return epoch_ms(dt.datetime.combine(day, dt.time(), LONDON))
