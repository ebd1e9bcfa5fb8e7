"""The error tree of cpis-bridge; each layer raises these and only the web edge renders them.

CpisError
 +-- ValidationFailed      input broke a rule (with a CPR/CPF code and field errors)      -> 422
 +-- UnreadableInput       a body could not be parsed at all          -> 400 (422 CPF01 on uploads)
 +-- NotFound              absent, or owned by someone else (the two look the same)          -> 404
 |   +-- MassEndRefused    a full upload would end too much of a caseload without confirming it -> 422
 +-- Conflict              the request contradicts stored state (e.g. a stale upload sequence) -> 409
 +-- Unauthenticated       no token, or a token that does not verify                          -> 401
 +-- Forbidden             a valid token without the right role or organisation                -> 403
 +-- PayloadTooLarge       a body over the size limit                                          -> 413
 +-- UnsupportedMediaType  a body in a content type the endpoint does not take                 -> 415
 +-- PreconditionFailed    a required precondition (e.g. CDS prefetch) is missing             -> 412
 +-- StoreUnavailable      Redis cannot be reached                                             -> 503
 +-- UploadInterrupted     an upload stopped (shutdown, lease lost) before its answer          -> 503

Messages never contain an NHS number or a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str
    code: str | None = None

    def as_dict(self) -> dict[str, str]:
        d = {"field": self.field, "message": self.message}
        if self.code:
            d["code"] = self.code
        return d


class CpisError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str = "", *, code: str | None = None, errors: list[FieldError] | None = None):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.code = code
        self.errors: list[FieldError] = errors or []


class ValidationFailed(CpisError):
    status = 422
    title = "Validation failed"


class UnreadableInput(CpisError):
    status = 400
    title = "Unreadable input"


class MassEndRefused(ValidationFailed):
    """A full upload would end more of the LA's records than it may without ``Upload-Confirm-End``."""

    def __init__(self, detail: str, *, would_end: int) -> None:
        super().__init__(detail, code="mass-end-refused")
        self.would_end = would_end


class NotFound(CpisError):
    status = 404
    title = "Not found"


class Conflict(CpisError):
    status = 409
    title = "Conflict"


class Unauthenticated(CpisError):
    status = 401
    title = "Unauthenticated"


class Forbidden(CpisError):
    status = 403
    title = "Forbidden"


class PayloadTooLarge(CpisError):
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(CpisError):
    status = 415
    title = "Unsupported media type"


class PreconditionFailed(CpisError):
    status = 412
    title = "Precondition failed"


class StoreUnavailable(CpisError):
    status = 503
    title = "Service unavailable"


class UploadInterrupted(CpisError):
    """An upload answered before it finished: the process is stopping, or it lost its lease to another process.
    ``applied`` says whether any of it may already be applied (then the service completes it)."""

    status = 503
    title = "Service unavailable"

    def __init__(self, detail: str, *, applied: bool) -> None:
        super().__init__(detail)
        self.applied = applied


@dataclass(slots=True)
class Problems:
    """Collects field errors while validating; raise with :meth:`raise_if_any`."""

    items: list[FieldError] = field(default_factory=list)

    def add(self, name: str, message: str, code: str | None = None) -> None:
        self.items.append(FieldError(name, message, code))

    def __bool__(self) -> bool:
        return bool(self.items)
