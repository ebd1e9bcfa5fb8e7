"""Synthetic data for the benchmarks: test-range NHS numbers only (999...), invented names, placeholder ODS codes.

Disjoint ranges of test numbers: HTTP-case children (flagged and not), the 250,000-record upload, the memory case.
"""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import orjson

from cpis_bridge.core.nhs import iter_test_numbers

LA_HTTP, LA_UPLOAD, LA_MEMORY = "LA001", "LA002", "LA003"
CARE_SETTING = "RXX01"
OTHER_CARE_SETTING = "GP001"  # in the registry; no bench look-up comes from it
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"

REGISTRY = f"""# cpis-bridge benchmark registry: invented organisations, placeholder ODS codes.
localAuthorities:
  - {{ods: {LA_HTTP}, name: Bench Borough Council,
     officeHoursPhone: "0300 000 0001", emergencyDutyPhone: "0300 000 0002"}}
  - {{ods: {LA_UPLOAD}, name: Bench County Council,
     officeHoursPhone: "0300 000 0011", emergencyDutyPhone: "0300 000 0012"}}
  - {{ods: {LA_MEMORY}, name: Bench City Council,
     officeHoursPhone: "0300 000 0021", emergencyDutyPhone: "0300 000 0022"}}
careSettings:
  - {{ods: {CARE_SETTING}, name: Bench Hospital Emergency Department, type: ED, unscheduled: true}}
  - {{ods: {OTHER_CARE_SETTING}, name: Bench Surgery, type: GP, unscheduled: false}}
"""

# Start offsets into iter_test_numbers (each yields ~10 valid numbers per 11 offsets).
_HTTP_START, _UPLOAD_START, _MEMORY_START = 0, 20_000, 600_000


def numbers(start: int, count: int) -> list[str]:
    return [str(n) for n in itertools.islice(iter_test_numbers(start), count)]


def http_numbers(flagged: int, unflagged: int) -> tuple[list[str], list[str]]:
    both = numbers(_HTTP_START, flagged + unflagged)
    return both[:flagged], both[flagged:]


def upload_numbers(count: int) -> list[str]:
    return numbers(_UPLOAD_START, count)


def memory_numbers(count: int) -> list[str]:
    return numbers(_MEMORY_START, count)


def record(i: int, nhs: str, prefix: str) -> dict[str, Any]:
    """A realistic record: mostly open CPPs, some LACs with a legal basis, some recently ended plans (all visible)."""
    start = dt.date(2025, 1, 1) + dt.timedelta(days=i % 300)
    body: dict[str, Any] = {
        "localId": f"{prefix}-{i:07d}",
        "planType": "CPP",
        "nhsNumber": nhs,
        "dateOfBirth": (dt.date(2012, 1, 1) + dt.timedelta(days=i % 3000)).isoformat(),
        "givenName": "Testchild",
        "familyName": "Example",
        "startDate": start.isoformat(),
        "endDate": None,
    }
    if i % 4 == 1:
        body["planType"] = "LAC"
        body["lacLegalBasis"] = "C2"
    if i % 10 == 3:  # ended two months ago: still inside the display window, so every child here is flagged
        body["endDate"] = (dt.date.today() - dt.timedelta(days=60)).isoformat()
    return body


def upload_body(nhs_numbers: list[str], *, sequence: int, mode: str, prefix: str) -> bytes:
    records = [record(i, nhs, prefix) for i, nhs in enumerate(nhs_numbers)]
    return orjson.dumps({"sequence": sequence, "mode": mode, "recordCount": len(records), "records": records})


def careteam_path(nhs: str) -> str:
    return f"/fhir/CareTeam?patient:identifier={NHS_SYSTEM}%7C{nhs}"


def flag_path(nhs: str) -> str:
    return f"/fhir/Flag?patient:identifier={NHS_SYSTEM}%7C{nhs}"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path
