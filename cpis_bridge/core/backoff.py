"""When to try again, in one place: the exponential backoff every retry loop of ours follows (docs/contract.md §6:
the wait after the n-th failure in a row doubles from ``first_s`` up to ``max_s``, with "equal jitter", a random
point in the upper half of that ceiling, so that processes which failed together do not retry together), and what a
server's ``Retry-After`` asks for (capped). Short in-request retries of an adapter use tenacity's wait strategies."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
import re
import time
from collections.abc import Callable
from typing import Final

_MAX_DOUBLINGS = 30  # 2**30 times any first delay is past every cap: no float overflow for a huge failure count
#: The longest wait a Retry-After can impose (docs/contract.md §5 and §6): a receiver or FHIR server asking for more
#: (or for a date days ahead) is asked again after an hour, so one bad header cannot stall a queue for days.
MAX_RETRY_AFTER_S: Final = 3600.0
_DELTA_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")  # RFC 9110 delta-seconds; a decimal is tolerated


def ceiling_s(failures: int, first_s: float, max_s: float) -> float:
    """The longest wait after ``failures`` failures in a row: ``first_s`` x 2^(failures-1), at most ``max_s``."""
    return min(max_s, first_s * float(2 ** min(max(failures - 1, 0), _MAX_DOUBLINGS)))


def backoff_s(failures: int, first_s: float, max_s: float, rnd: float) -> float:
    """The wait after ``failures`` failures in a row, in [ceiling/2, ceiling]; ``rnd`` is a draw from [0, 1) (passed
    in, so a schedule is reproducible in tests)."""
    ceiling = ceiling_s(failures, first_s, max_s)
    return ceiling / 2 + rnd * ceiling / 2


class Backoff:
    """A loop's backoff state: :meth:`next` after each failure in a row, :meth:`reset` after a success. Without
    ``jitter`` the wait is the ceiling itself (a single loop of one process, where there is no herd to spread)."""

    def __init__(
        self, first_s: float, max_s: float, *, jitter: bool = True, rnd: Callable[[], float] = random.random
    ) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.jitter = jitter
        self.rnd = rnd
        self.failures = 0

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (the first: about ``first_s``)."""
        if not self.jitter:
            return ceiling_s(failures, self.first_s, self.max_s)
        return backoff_s(failures, self.first_s, self.max_s, self.rnd())

    def next(self) -> float:
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (``now``: epoch seconds, default
    the current time), at least 0 and at most :data:`MAX_RETRY_AFTER_S`; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)  # RFC 9110: an HTTP date is GMT
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER_S)
