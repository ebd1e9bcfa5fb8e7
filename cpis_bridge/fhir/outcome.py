"""OperationOutcome rendering for errors and informational answers under /fhir (FHIR R4 issue types)."""

from __future__ import annotations

from typing import Any

_ISSUE_CODE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 409: "conflict", 412: "conflict",
               413: "too-long", 415: "not-supported", 422: "invalid", 429: "throttled", 503: "transient"}


def operation_outcome(
    status: int,
    diagnostics: str,
    *,
    severity: str | None = None,
    code: str | None = None,
    expression: list[str] | None = None,
    extra_issues: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": severity or ("error" if status >= 400 else "information"),
        "code": code or _ISSUE_CODE.get(status, "exception" if status >= 500 else "informational"),
        "diagnostics": diagnostics,
    }
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue, *(extra_issues or [])]}
