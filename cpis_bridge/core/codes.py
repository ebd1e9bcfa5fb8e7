"""The national CP-IS result codes: file-level CPF codes and record-level CPR codes."""

from __future__ import annotations

from enum import StrEnum


class FileCode(StrEnum):
    UNREADABLE = "CPF01"  # bad format, or record count does not match
    ALL_UPLOADED = "CPF02"
    PARTIAL = "CPF03"
    NONE_UPLOADED = "CPF04"


class RecordCode(StrEnum):
    PDS_NO_MATCH = "CPR01"  # reserved for demographic verification
    PDS_SENSITIVE = "CPR02"
    PDS_NOT_VERIFIED = "CPR03"
    NHS_NUMBER_FORMAT = "CPR04"
    PDS_SUPERSEDED = "CPR05"
    UPLOADED = "CPR06"
    VALIDATION_FAILED = "CPR07"


def file_code(accepted: int, rejected: int) -> FileCode:
    """The file code for a readable file with this many accepted and rejected records."""
    if accepted and not rejected:
        return FileCode.ALL_UPLOADED
    if accepted:
        return FileCode.PARTIAL
    if rejected:
        return FileCode.NONE_UPLOADED
    return FileCode.ALL_UPLOADED  # an empty full upload is a valid (if drastic) caseload
