"""Exponential backoff, the one rule every retry loop of ours follows (docs/contract.md §6): the wait after the n-th
failure in a row doubles from ``first_s`` up to ``max_s``, with "equal jitter" (a random point in the upper half of
that ceiling) so that processes which failed together do not retry together. Short in-request retries of an adapter
use tenacity's wait strategies instead."""

from __future__ import annotations

import random
from collections.abc import Callable

_MAX_DOUBLINGS = 30  # 2**30 times any first delay is past every cap: no float overflow for a huge failure count


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
