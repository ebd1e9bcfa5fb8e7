"""The visibility rule exists twice by necessity: in Python (core/records.py, for reads, Flag status and the sync
schedule) and in Lua (store/lua/lib.lua, inside the look-up's atomic step). This property test runs the Lua rule in a
real Redis on the stored (compact) form of random records and days, dense around every boundary (start, end plus the
plan's window, delete date), and requires the same answer as Record.is_visible for each."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

import cpis_bridge.store
from cpis_bridge.core.clock import epoch_day
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.records import PlanType, Record, VisibilityWindows

HARNESS = """
-- ARGV[1] window, ARGV[2] UCPP window, then per case: the day (epoch day), the record's compact JSON.
local out = {}
for i = 3, #ARGV, 2 do
  out[#out + 1] = is_visible(cjson.decode(ARGV[i + 1]), tonumber(ARGV[i]), tonumber(ARGV[1]), tonumber(ARGV[2]))
    and 1 or 0
end
return out
"""
LIB = (Path(cpis_bridge.store.__file__).parent / "lua" / "lib.lua").read_text()
NHS = NhsNumber.parse("9990000018")
days = st.dates(dt.date(1900, 1, 1), dt.date(2150, 12, 31))


@pytest.fixture(scope="module")
def lua_visible(redis_url: str) -> Iterator[Any]:
    client = Redis.from_url(redis_url, decode_responses=True)
    script = client.register_script(LIB + "\n" + HARNESS)

    def run(windows: VisibilityWindows, cases: list[tuple[Record, dt.date]]) -> list[bool]:
        args: list[Any] = [windows.after_end_days, windows.ucpp_after_end_days]
        for record, day in cases:
            args += [epoch_day(day), orjson.dumps(record.to_compact())]
        return [bool(v) for v in script(keys=[], args=args)]

    yield run
    client.close()


@st.composite
def case(draw: st.DrawFn, windows: VisibilityWindows) -> tuple[Record, dt.date]:
    plan = draw(st.sampled_from(PlanType))
    start = draw(days)
    end = draw(st.none() | st.integers(-3, 900).map(lambda n: start + dt.timedelta(days=n)))
    delete = draw(st.none() | st.integers(-3, 1500).map(lambda n: start + dt.timedelta(days=n)))
    edges = [start, delete or start]
    if end is not None:
        edges.append(end + dt.timedelta(days=windows.for_plan(plan)))
    day = draw(st.sampled_from(edges)) + dt.timedelta(days=draw(st.integers(-2, 2)))
    day = draw(st.just(day) | days)  # mostly at an edge, sometimes anywhere
    record = Record(
        la="LA001",
        local_id="A",
        plan_type=plan,
        nhs_number=NHS,
        date_of_birth=dt.date(1890, 1, 1),
        start_date=start,
        end_date=end,
        delete_date=delete,
    )
    return record, day


@st.composite
def batch(draw: st.DrawFn) -> tuple[VisibilityWindows, list[tuple[Record, dt.date]]]:
    windows = VisibilityWindows(draw(st.integers(0, 800)), draw(st.integers(0, 800)))
    return windows, draw(st.lists(case(windows), min_size=1, max_size=25))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch())
def test_lua_and_python_agree_on_visibility(
    lua_visible: Any, drawn: tuple[VisibilityWindows, list[tuple[Record, dt.date]]]
) -> None:
    windows, cases = drawn
    expected = [record.is_visible(day, windows) for record, day in cases]
    assert lua_visible(windows, cases) == expected, [
        (r.plan_type.value, r.start_date, r.end_date, r.delete_date, d)
        for (r, d), a, b in zip(cases, lua_visible(windows, cases), expected, strict=True)
        if a != b
    ]


def test_the_edges_by_hand(lua_visible: Any) -> None:
    """The documented rule (docs/domain.md) at its edges, so a shared mistake of both sides is caught too."""
    w = VisibilityWindows(364, 28)
    start, end, delete = dt.date(2026, 1, 10), dt.date(2026, 3, 1), dt.date(2026, 3, 20)

    def rec(plan: PlanType, end_: dt.date | None, delete_: dt.date | None) -> Record:
        return Record("LA001", "A", plan, NHS, dt.date(2020, 1, 1), start, end_date=end_, delete_date=delete_)

    cases = [
        (rec(PlanType.CPP, None, None), start - dt.timedelta(days=1), False),
        (rec(PlanType.CPP, None, None), start, True),
        (rec(PlanType.CPP, end, None), end + dt.timedelta(days=364), True),
        (rec(PlanType.CPP, end, None), end + dt.timedelta(days=365), False),
        (rec(PlanType.UCPP, end, None), end + dt.timedelta(days=28), True),
        (rec(PlanType.UCPP, end, None), end + dt.timedelta(days=29), False),
        (rec(PlanType.LAC, None, delete), delete - dt.timedelta(days=1), True),
        (rec(PlanType.LAC, None, delete), delete, False),
    ]
    assert lua_visible(w, [(r, d) for r, d, _ in cases]) == [v for _, _, v in cases]
    assert [r.is_visible(d, w) for r, d, _ in cases] == [v for _, _, v in cases]
