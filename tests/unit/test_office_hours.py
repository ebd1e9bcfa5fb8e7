"""An LA's office hours: the number to ring now (weekdays, times, England bank holidays, clock changes), and the
registry's officeHours entry with its validation errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from cpis_bridge.core.clock import LONDON
from cpis_bridge.core.registry import DEFAULT_OFFICE_HOURS, OfficeHours, bank_holidays, office_open
from cpis_bridge.registry import RegistryError, load_registry


def london(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=LONDON)


@pytest.mark.parametrize(
    "when,is_open",
    [
        (london(2026, 12, 3, 9, 0), True),  # Thursday, opening time
        (london(2026, 12, 3, 8, 59), False),
        (london(2026, 12, 3, 16, 59), True),
        (london(2026, 12, 3, 17, 0), False),  # closing time: emergency duty
        (london(2026, 12, 5, 12, 0), False),  # Saturday
        (london(2026, 12, 25, 12, 0), False),  # Christmas Day
        (london(2026, 12, 28, 12, 0), False),  # Boxing Day substitute (a Monday)
        (london(2026, 8, 31, 12, 0), False),  # summer bank holiday (England only)
        (london(2026, 3, 17, 12, 0), True),  # St Patrick's Day: a Northern Ireland holiday, not England's
        (dt.datetime(2026, 7, 1, 8, 30, tzinfo=dt.UTC), True),  # 09:30 BST
        (dt.datetime(2026, 7, 1, 16, 30, tzinfo=dt.UTC), False),  # 17:30 BST
        (dt.datetime(2026, 1, 7, 16, 30, tzinfo=dt.UTC), True),  # 16:30 GMT
    ],
)
def test_default_office_hours(when, is_open):
    assert DEFAULT_OFFICE_HOURS.open_at(when) is is_open
    assert office_open(DEFAULT_OFFICE_HOURS, when) is is_open


def test_bank_holidays_come_from_the_holidays_package_per_year():
    days = bank_holidays(2027)
    # early May, and Christmas and Boxing Day falling on a weekend: substitute days Monday and Tuesday
    assert {dt.date(2027, 5, 3), dt.date(2027, 12, 27), dt.date(2027, 12, 28)} <= days
    assert dt.date(2027, 7, 12) not in days  # Northern Ireland's Battle of the Boyne holiday
    assert bank_holidays(2027) is days  # built once


def test_own_hours_and_bank_holidays_open():
    always = OfficeHours(frozenset(range(7)), dt.time(0, 0), dt.time.max, True)
    assert always.open_at(london(2026, 12, 25, 23, 59)) and always.open_at(london(2026, 12, 26, 0, 0))
    saturday_morning = OfficeHours(frozenset({5}), dt.time(8, 30), dt.time(12, 0))
    assert saturday_morning.open_at(london(2026, 12, 5, 8, 30))
    assert not saturday_morning.open_at(london(2026, 12, 3, 10, 0))


def registry(tmp_path: Path, office_hours: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(
        "localAuthorities:\n"
        "  - {ods: LA001, name: Example Council, officeHoursPhone: '0300 000 0001', "
        f"emergencyDutyPhone: '0300 000 0002'{office_hours}}}\n"
        "careSettings: []\n"
    )
    return path


def test_registry_office_hours_default_and_given(tmp_path):
    assert load_registry(registry(tmp_path, "")).local_authorities["LA001"].office_hours == DEFAULT_OFFICE_HOURS
    given = ", officeHours: {days: [Sat, Sun], open: '10:00', close: '24:00', bankHolidays: open}"
    hours = load_registry(registry(tmp_path, given)).local_authorities["LA001"].office_hours
    assert hours == OfficeHours(frozenset({5, 6}), dt.time(10, 0), dt.time.max, True)


@pytest.mark.parametrize(
    "office_hours,message",
    [
        (", officeHours: {days: [Monday]}", "field officeHours.days.0"),
        (", officeHours: {open: '9am'}", "field officeHours.open"),
        (", officeHours: {open: '17:00', close: '09:00'}", "open (17:00) must be before close (09:00)"),
        (", officeHours: {bankHolidays: sometimes}", "field officeHours.bankHolidays"),
        (", officeHours: {hours: 3}", "field officeHours.hours"),
    ],
)
def test_registry_office_hours_errors_name_the_field(tmp_path, office_hours, message):
    with pytest.raises(RegistryError) as exc:
        load_registry(registry(tmp_path, office_hours))
    assert "local authority #1 (LA001)" in str(exc.value) and message in str(exc.value)
