"""FHIR R4 mapping (pure functions over fhir.resources.R4B shapes), OperationOutcome rendering, the outbound client."""
