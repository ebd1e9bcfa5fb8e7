"""NHS numbers as a typed value: parsing, the Modulus 11 check, the never-issued test range, and the keyed hash that
stands in for a number wherever the number itself must not appear (key names, logs, audit entries of no record)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Final

_WEIGHTS: Final = (10, 9, 8, 7, 6, 5, 4, 3, 2)
TEST_RANGE_PREFIX: Final = "999"
# The check digit by (weighted sum mod 11): 11 - r, where 11 means 0 and 10 means no valid number.
_CHECK: Final[tuple[int | None, ...]] = tuple(0 if r == 0 else None if r == 1 else 11 - r for r in range(11))


class InvalidNhsNumber(ValueError):
    """The text is not a valid NHS number. The message never repeats the input."""


def check_digit(first_nine: str) -> int | None:
    """The Modulus 11 check digit for nine digits, or None when the result is 10 (no valid number)."""
    if len(first_nine) == 9 and first_nine.isascii() and first_nine.isdigit():
        b = first_nine.encode()  # ASCII digits: byte - 48 is the digit; weights sum to 54
        total = (
            10 * b[0] + 9 * b[1] + 8 * b[2] + 7 * b[3] + 6 * b[4] + 5 * b[5] + 4 * b[6] + 3 * b[7] + 2 * b[8] - 48 * 54
        )
    else:
        total = sum(int(d) * w for d, w in zip(first_nine, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


class NhsNumber(str):
    """A valid 10-digit NHS number (a ``str`` subclass holding only the digits).

    Construct with :meth:`parse`; ``str(n)`` is the canonical ten digits. The repr hides the value so that
    an NHS number cannot leak into a log line through an exception or a debug print.
    """

    __slots__ = ()

    @classmethod
    def parse(cls, text: object, *, test_range_only: bool = False) -> NhsNumber:
        if not isinstance(text, str):
            raise InvalidNhsNumber("NHS number must be a string of 10 digits")
        digits = text.replace(" ", "").replace("-", "")
        if len(digits) != 10 or not digits.isascii() or not digits.isdigit():
            raise InvalidNhsNumber("NHS number must be 10 digits")
        if check_digit(digits[:9]) != int(digits[9]):
            raise InvalidNhsNumber("NHS number fails the Modulus 11 check")
        if test_range_only and not digits.startswith(TEST_RANGE_PREFIX):
            raise InvalidNhsNumber("only test-range NHS numbers (999 000 0000 - 999 999 9999) are accepted here")
        return cls(digits)

    def __repr__(self) -> str:
        return "NhsNumber(<redacted>)"

    @property
    def is_test_range(self) -> bool:
        return self.startswith(TEST_RANGE_PREFIX)


def iter_test_numbers(start: int = 0) -> Iterator[NhsNumber]:
    """Valid test-range NHS numbers in ascending order, from 999 000 0000 + start*10 (for demos and tests)."""
    for n in range(start, 1_000_000):
        nine = f"999{n:06d}"
        cd = check_digit(nine)
        if cd is not None:
            yield NhsNumber(nine + str(cd))


#: Hex characters of the keyed hash kept (80 bits): the same tag names a child's Redis keys, stands in for the
#: number in audit entries and log lines, so a log line's ``nhs#<tag>`` is the tag of that child's keys.
TAG_HEX: Final = 20


class NhsTagger:
    """The keyed hash of an NHS number: HMAC-SHA256 under ``CPIS_LOG_HASH_KEY``, the first :data:`TAG_HEX` hex
    characters. The HMAC key schedule is done once (pre-keyed SHA-256 states, copied per call): faster than
    ``hmac.digest`` and never releasing the GIL per call (bench/README.md)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        padded = (hashlib.sha256(key).digest() if len(key) > block else key).ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def __call__(self, nhs: str) -> str:
        """The tag of ``nhs`` (its ten digits, as :meth:`NhsNumber.parse` leaves them)."""
        inner = self._inner.copy()
        inner.update(nhs.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:TAG_HEX]
