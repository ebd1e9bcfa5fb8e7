"""Europe/London loads from the tzdata package when the machine has no time-zone database (slim images)."""

import os
import subprocess
import sys

PROBE = """
import datetime as dt
from cpis_bridge.core.clock import LONDON
print(dt.datetime(2027, 7, 1, 12, tzinfo=LONDON).utcoffset(), dt.datetime(2027, 1, 1, 12, tzinfo=LONDON).utcoffset())
"""


def test_london_rules_come_from_the_tzdata_package_without_a_system_database():
    env = {**os.environ, "PYTHONTZPATH": ""}  # no system zoneinfo directories: only the tzdata package can answer
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1:00:00", "0:00:00"]  # BST in July, GMT in January
