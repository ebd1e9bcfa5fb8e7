"""When a record is past retention: its visibility must have ended more than the kept days ago (windows per plan
type, delete dates), and an open record never is."""

import datetime as dt

import pytest

from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.records import PlanType, Record, VisibilityWindows
from cpis_bridge.services.retention import record_expired

W = VisibilityWindows(after_end_days=364, ucpp_after_end_days=28)
TODAY = dt.date(2026, 11, 22)


def rec(plan=PlanType.CPP, end=None, delete=None) -> Record:
    return Record(
        la="LA001",
        local_id="C-1",
        plan_type=plan,
        nhs_number=NhsNumber("9990000018"),
        date_of_birth=dt.date(2016, 1, 1),
        start_date=dt.date(2020, 1, 1),
        end_date=end,
        delete_date=delete,
    )


@pytest.mark.parametrize(
    ("record", "keep", "expired"),
    [
        (rec(), 0, False),  # open: visible for ever
        (rec(end=TODAY - dt.timedelta(days=364 + 90)), 90, False),  # ended visibility 90 days ago
        (rec(end=TODAY - dt.timedelta(days=364 + 91)), 90, True),  # 91 days ago
        (rec(PlanType.UCPP, end=TODAY - dt.timedelta(days=28 + 91)), 90, True),  # UCPP: 28-day window
        (rec(PlanType.UCPP, end=TODAY - dt.timedelta(days=28 + 90)), 90, False),
        (rec(delete=TODAY - dt.timedelta(days=90)), 90, True),  # last visible: the day before delete
        (rec(delete=TODAY - dt.timedelta(days=89)), 90, False),
        (rec(end=TODAY - dt.timedelta(days=400), delete=TODAY - dt.timedelta(days=5)), 0, True),
    ],
)
def test_record_expired(record, keep, expired):
    assert record_expired(record, TODAY, W, keep) is expired
