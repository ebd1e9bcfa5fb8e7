"""OperationOutcome rendering for errors and informational answers under /fhir: FHIR R4 issue types, and the
national error code (UK Core Spine error or warning code) in ``issue[].details.coding`` of every error."""

from __future__ import annotations

from typing import Any, Final

SPINE_ERRORS: Final = "https://fhir.hl7.org.uk/CodeSystem/UKCore-SpineErrorOrWarningCode"
# The codes of that system this API answers with, and their displays as the system gives them (version 1.0.0).
SPINE_DISPLAY: Final[dict[str, str]] = {
    "ACCESS_DENIED": "Access has been denied to process this request",
    "FAILURE_TO_PROCESS_MESSAGE": "Failure to process message",
    "UNABLE_TO_CALL_SERVICE": "Unable to call service",
    "UNSUPPORTED_SERVICE": "Unsupported service",
    "RESOURCE_NOT_FOUND": "Resource not found",
    "INVALID_SEARCH_DATA": "Invalid search data",
    "PRECONDITION_FAILED": "Precondition failed",
    "VALIDATION_ERROR": "Validation error",
    "INVALID_VALUE": "Invalid value",
    "UNSUPPORTED_VALUE": "Unsupported value",
}
# The national code for an HTTP status when the raiser named none. 429 has no code in that system: none is sent.
SPINE_FOR_STATUS: Final[dict[int, str]] = {
    400: "VALIDATION_ERROR",
    401: "ACCESS_DENIED",
    403: "ACCESS_DENIED",
    404: "RESOURCE_NOT_FOUND",
    405: "UNSUPPORTED_SERVICE",
    406: "UNSUPPORTED_VALUE",
    409: "VALIDATION_ERROR",
    412: "PRECONDITION_FAILED",
    413: "INVALID_VALUE",
    415: "UNSUPPORTED_VALUE",
    422: "VALIDATION_ERROR",
    500: "FAILURE_TO_PROCESS_MESSAGE",
    503: "UNABLE_TO_CALL_SERVICE",
    504: "UNABLE_TO_CALL_SERVICE",
}
_ISSUE_CODE: Final = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    412: "conflict",
    413: "too-long",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
    503: "transient",
    504: "timeout",
}


def spine_coding(code: str) -> dict[str, Any]:
    return {"coding": [{"system": SPINE_ERRORS, "version": "1.0.0", "code": code, "display": SPINE_DISPLAY[code]}]}


def operation_outcome(
    status: int,
    diagnostics: str,
    *,
    severity: str | None = None,
    code: str | None = None,
    spine: str | None = None,
    expression: list[str] | None = None,
    extra_issues: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``spine`` names the national code; errors (status >= 400) without one get the status's code."""
    issue: dict[str, Any] = {
        "severity": severity or ("error" if status >= 400 else "information"),
        "code": code
        or _ISSUE_CODE.get(
            status, "exception" if status >= 500 else "processing" if status >= 400 else "informational"
        ),
    }
    if status >= 400:
        national = (
            spine
            if spine in SPINE_DISPLAY
            else SPINE_FOR_STATUS.get(status, "FAILURE_TO_PROCESS_MESSAGE" if status >= 500 else None)
        )
        if national is not None:
            issue["details"] = spine_coding(national)
    issue["diagnostics"] = diagnostics
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue, *(extra_issues or [])]}
