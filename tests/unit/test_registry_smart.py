"""The registry's SMART launch entries (the clinician view): loaded as given, issuers compared exactly, frame origins
bare origins, one client id per EHR issuer; errors name the care setting and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpis_bridge.core.registry import SmartLaunch
from cpis_bridge.registry import RegistryError, load_registry

HEAD = """localAuthorities:
  - {ods: LA001, name: Example Council, officeHoursPhone: "0300 000 0001", emergencyDutyPhone: "0300 000 0002"}
careSettings:
"""


def registry(tmp_path: Path, *settings: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(HEAD + "".join(f"  - {s}\n" for s in settings))
    return path


ED = "{ods: RXX01, name: Example ED, type: ED, unscheduled: true, smartLaunch: %s}"
UTC = "{ods: RXX02, name: Example UTC, type: UTC, unscheduled: true, smartLaunch: %s}"


def test_smart_launch_loaded(tmp_path: Path) -> None:
    smart = "{clientId: cpis, issuers: ['https://ehr.example/fhir/'], frameOrigins: ['https://ehr.example:443']}"
    reg = load_registry(registry(tmp_path, ED % smart, "{ods: GP001, name: Surgery, type: GP, unscheduled: false}"))
    assert reg.care_settings["RXX01"].smart == SmartLaunch(
        "cpis", frozenset({"https://ehr.example/fhir"}), ("https://ehr.example",)
    )
    assert reg.care_settings["GP001"].smart is None
    assert [c.ods for c in reg.smart_settings("https://ehr.example/fhir")] == ["RXX01"]
    assert reg.smart_settings("https://ehr.example/fhir/other") == []


@pytest.mark.parametrize(
    ("smart", "message"),
    [
        ("{clientId: cpis, issuers: []}", "field smartLaunch.issuers"),
        ("{clientId: cpis, issuers: ['ehr.example/fhir']}", "field smartLaunch.issuers"),
        ("{clientId: '', issuers: ['https://ehr.example/fhir']}", "field smartLaunch.clientId"),
        ("{clientId: cpis, issuers: ['https://e.example'], frameOrigins: ['https://e.example/x']}", "frameOrigins"),
        ("{clientId: cpis, issuers: ['https://e.example'], frameAncestors: ['https://e.example']}", "frameAncestors"),
    ],
)
def test_smart_launch_errors_name_the_field(tmp_path: Path, smart: str, message: str) -> None:
    with pytest.raises(RegistryError) as exc:
        load_registry(registry(tmp_path, ED % smart))
    assert "care setting #1 (RXX01)" in str(exc.value) and message in str(exc.value)


def test_one_client_id_per_issuer(tmp_path: Path) -> None:
    shared = "{clientId: %s, issuers: ['https://ehr.example/fhir']}"
    reg = load_registry(registry(tmp_path, ED % (shared % "cpis"), UTC % (shared % "cpis")))
    assert sorted(c.ods for c in reg.smart_settings("https://ehr.example/fhir")) == ["RXX01", "RXX02"]
    with pytest.raises(RegistryError) as exc:
        load_registry(registry(tmp_path, ED % (shared % "cpis"), UTC % (shared % "other")))
    assert "care setting #2 (RXX02), field smartLaunch.clientId" in str(exc.value)
