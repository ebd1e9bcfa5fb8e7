"""fhir_profiles/: valid R4 StructureDefinitions deriving from UK Core, examples that conform, a CapabilityStatement
identical to the one served; and the differential checker itself catches what it claims to check."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from cpis_bridge.fhir import mapping as m
from tests.support.profiles import check_differential, conformance_problems, load_definitions, validate_r4

PROFILES = Path(__file__).resolve().parents[2] / "fhir_profiles"
UKCORE = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-"


@cache
def definitions() -> tuple[dict[str, dict[str, Any]], dict[str, set[tuple[str | None, str]]]]:
    return load_definitions(PROFILES)


def assert_conforms(resource: dict[str, Any]) -> None:
    """R4 with fhir.resources R4B, and every declared profile of ours (Bundles: each entry)."""
    validate_r4(resource)
    sds, valuesets = definitions()
    problems = conformance_problems(resource, sds, valuesets)
    assert problems == [], problems


def profile(name: str) -> dict[str, Any]:
    return definitions()[0][f"https://cpis-bridge.example.org/fhir/StructureDefinition/{name}"]


def example(name: str) -> dict[str, Any]:
    return json.loads((PROFILES / "examples" / f"{name}.json").read_text())


def test_every_file_is_valid_r4_and_declares_4_0_1():
    files = sorted(p for p in PROFILES.glob("*.json") if p.name != "package.json")
    assert len(files) >= 12
    for path in files:
        res = json.loads(path.read_text())
        validate_r4(res)
        if res["resourceType"] in ("StructureDefinition", "CapabilityStatement"):
            assert res["fhirVersion"] == "4.0.1", path.name
    assert json.loads((PROFILES / "package.json").read_text())["fhirVersions"] == ["4.0.1"]


@pytest.mark.parametrize(
    "name,base",
    [
        ("CPIS-Flag", "Flag"),
        ("CPIS-CareTeam", "CareTeam"),
        ("CPIS-AuditEvent", "AuditEvent"),
        ("CPIS-Encounter", "Encounter"),
        ("CPIS-Organization", "Organization"),
    ],
)
def test_profiles_derive_from_uk_core(name, base):
    sd = profile(name)
    assert sd["baseDefinition"] == UKCORE + base and sd["derivation"] == "constraint" and sd["type"] == base
    ids = [e["id"] for e in sd["differential"]["element"]]
    assert ids[0] == base and len(ids) == len(set(ids))
    assert all(e["path"].split(".")[0] == base for e in sd["differential"]["element"])


@pytest.mark.parametrize("path", sorted((PROFILES / "examples").glob("*.json")), ids=lambda p: p.stem)
def test_examples_conform(path):
    res = json.loads(path.read_text())
    assert_conforms(res)
    if res["resourceType"] in ("Flag", "CareTeam", "AuditEvent", "Organization"):
        assert (res.get("meta") or {}).get("profile"), "example declares its profile"


def test_checker_catches_cardinality_fixed_pattern_binding_and_slices():
    _, vs = definitions()
    flag = example("Flag-example")
    sd = profile("CPIS-Flag")
    assert check_differential(flag, sd, vs) == []
    bad = copy.deepcopy(flag)
    del bad["period"]
    assert any("Flag.period" in p for p in check_differential(bad, sd, vs))
    bad = copy.deepcopy(flag)
    bad["subject"]["identifier"]["system"] = "https://example.org/other"
    assert any("fixed" in p for p in check_differential(bad, sd, vs))
    bad = copy.deepcopy(flag)
    bad["category"] = bad["category"][:1]
    assert any("Flag.category:cpis" in p for p in check_differential(bad, sd, vs))
    bad = copy.deepcopy(flag)
    bad["code"]["coding"] = [{"system": "http://snomed.info/sct", "code": "22298006"}]
    assert any("cpis-plan-type" in p for p in check_differential(bad, sd, vs))
    bad = copy.deepcopy(flag)
    bad["status"] = "proposed"
    assert any("flag-status" in p for p in check_differential(bad, sd, vs))
    org = example("Organization-example")
    bad = copy.deepcopy(org)
    bad["contact"] = bad["contact"][:1]
    problems = check_differential(bad, profile("CPIS-Organization"), vs)
    assert any("emergencyDuty" in p for p in problems)
    audit = example("AuditEvent-example")
    bad = copy.deepcopy(audit)
    bad["agent"][0]["requestor"] = False
    assert any("requestor" in p for p in check_differential(bad, profile("CPIS-AuditEvent"), vs))
    bad = copy.deepcopy(audit)
    bad["entity"] = [e for e in bad["entity"] if e["type"]["code"] != "ASSIGNED"]
    assert any("entity:user" in p for p in check_differential(bad, profile("CPIS-AuditEvent"), vs))


async def test_served_capability_statement_is_the_published_one(client):
    r = await client.get("/fhir/metadata")
    assert r.status == 200 and r.content_type == "application/fhir+json"
    served = await r.json(content_type=None)
    assert_conforms(served)
    published = json.loads((PROFILES / "CapabilityStatement-cpis-bridge.json").read_text())
    served["implementation"].pop("url", None)
    published["implementation"].pop("url", None)
    assert served == published


def test_checker_catches_unlabelled_or_mislabelled_la_numbers():
    _, vs = definitions()
    team = example("CareTeam-example")
    sd = profile("CPIS-CareTeam")
    assert check_differential(team, sd, vs) == []
    bad = copy.deepcopy(team)
    del bad["telecom"][0]["extension"]
    assert any("CareTeam.telecom.extension:contactPurpose" in p for p in check_differential(bad, sd, vs))
    bad = copy.deepcopy(team)
    bad["telecom"][1]["extension"][0]["valueCoding"]["code"] = "switchboard"
    assert any("la-contact-purpose" in p for p in check_differential(bad, sd, vs))
    bad = copy.deepcopy(team)
    del bad["telecom"][1]["rank"]
    assert any("CareTeam.telecom.rank" in p for p in check_differential(bad, sd, vs))
    assert definitions()[0][m.EXT_CONTACT_PURPOSE]["type"] == "Extension"
