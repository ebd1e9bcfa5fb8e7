"""The one backoff rule (core/backoff.py) every retry loop uses: doubling from the first delay to the cap, equal
jitter, and the same numbers from the delivery policy, the Flag sync relay and the plain error loops."""

from __future__ import annotations

import pytest

from cpis_bridge.core.backoff import Backoff, backoff_s, ceiling_s
from cpis_bridge.services.delivery import RetryPolicy


@pytest.mark.parametrize(("failures", "ceiling"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (10**6, 60.0)])
def test_the_ceiling_doubles_from_the_first_delay_to_the_cap(failures: int, ceiling: float) -> None:
    assert ceiling_s(failures, 1.0, 60.0) == ceiling


@pytest.mark.parametrize("rnd", [0.0, 0.25, 0.999])
def test_equal_jitter_stays_in_the_upper_half_of_the_ceiling(rnd: float) -> None:
    for failures in range(1, 12):
        ceiling = ceiling_s(failures, 0.5, 30.0)
        assert ceiling / 2 <= backoff_s(failures, 0.5, 30.0, rnd) <= ceiling
        assert RetryPolicy(first_retry_s=0.5, max_backoff_s=30.0).backoff(failures, rnd) == backoff_s(
            failures, 0.5, 30.0, rnd
        )


def test_a_loop_backs_off_while_failing_and_starts_again_after_a_success() -> None:
    draws = iter([0.0, 1.0 - 1e-9, 0.5])
    errors = Backoff(0.2, 10.0, rnd=lambda: next(draws))
    assert errors.next() == pytest.approx(0.1)  # the first failure: half of 0.2 at the lowest draw
    assert errors.next() == pytest.approx(0.4)  # the second: all of 0.4 at the highest
    errors.reset()
    assert errors.next() == pytest.approx(0.15)


def test_without_jitter_the_wait_is_the_ceiling() -> None:
    errors = Backoff(0.2, 5.0, jitter=False)
    assert [errors.next() for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
