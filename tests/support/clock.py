"""Clocks tests inject through the services' ``Clock`` seam (cpis_bridge/core/clock.py) to move time instead of
sleeping: a manual clock that stands still until told, and the real clock shifted to another day."""

from __future__ import annotations

import datetime as dt


class ManualClock:
    """Stands at ``now`` until the test sets or advances it."""

    def __init__(self, now: dt.datetime | None = None) -> None:
        self.now = now or dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> dt.datetime:
        """Move on by ``dt.timedelta(**delta)``; returns the new instant."""
        self.now += dt.timedelta(**delta)
        return self.now


class ShiftedClock:
    """The real time, shifted by ``offset`` (so time still runs, for code that also waits on the event loop)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def set_day(self, day: dt.date) -> None:
        """Move to noon (London) on ``day``."""
        target = dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)
        self.offset = target - dt.datetime.now(dt.UTC)
