"""The hand-checked plain Encounter shape gives exactly what the R4B model path gives, and refuses to guess."""

from __future__ import annotations

from typing import Any

import pytest

from cpis_bridge.fhir.encounter import _plain, parse_encounter

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def plain_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Encounter",
        "status": "in-progress",
        "identifier": [{"system": "https://ed.example/encounter-id", "value": "enc-1"}],
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "EMER",
            "display": "Emergency care",
        },
        "subject": {"identifier": {"system": NHS, "value": "9990000018"}},
        "period": {"start": "2026-01-01T10:00:00.123+01:00", "end": "2026-01-01T12:00:00Z"},
    }
    body.update(over)
    return body


def test_plain_shape_matches_the_model_path() -> None:
    body = plain_body()
    fast = _plain(body, True)
    assert fast is not None
    # an element the plain check does not know sends the same body through the R4B model
    modelled = parse_encounter({**body, "language": "en-GB"}, test_numbers_only=True)
    assert (fast.source_event_id, fast.nhs, fast.arrived_at, fast.minimal) == (
        modelled.source_event_id,
        modelled.nhs,
        modelled.arrived_at,
        modelled.minimal,
    )
    assert parse_encounter(body, test_numbers_only=True) == fast


@pytest.mark.parametrize(
    "over",
    [
        {"status": "bogus"},
        {"identifier": [{"system": "s", "value": "a b"}]},
        {"class": {"code": "A B"}},
        {"subject": {"identifier": {"system": NHS, "value": "9990000019"}}},
        {"period": {"start": "2026-02-31T10:00:00Z"}},
        {"period": {"start": "2026-01-01T10:00:00"}},
        {"period": {"start": "2026-01-01"}},
        {"period": {"start": 1767261600}},
        {"id": "x"},
    ],
)
def test_anything_else_goes_to_the_model(over: dict[str, Any]) -> None:
    assert _plain(plain_body(**over), True) is None
