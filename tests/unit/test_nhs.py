"""NhsNumber: Modulus 11 against an independent implementation, formatting, the test range, no leaks in repr."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpis_bridge.core.nhs import InvalidNhsNumber, NhsNumber, iter_test_numbers


def reference_valid(digits: str) -> bool:
    total = sum(int(d) * (10 - i) for i, d in enumerate(digits[:9]))
    remainder = total % 11
    check = 0 if remainder == 0 else 11 - remainder
    return check != 10 and check == int(digits[9])


@given(st.text(alphabet="0123456789", min_size=10, max_size=10))
def test_mod11_agrees_with_reference(digits: str) -> None:
    if reference_valid(digits):
        assert NhsNumber.parse(digits) == digits
    else:
        with pytest.raises(InvalidNhsNumber):
            NhsNumber.parse(digits)


@given(st.integers(min_value=0, max_value=99_999))
def test_generated_test_numbers_are_valid_and_in_range(start: int) -> None:
    n = next(iter_test_numbers(start))
    assert reference_valid(n) and n.startswith("999") and n.is_test_range


@given(st.text(max_size=20))
def test_arbitrary_text_never_crashes_and_never_echoes(text: str) -> None:
    try:
        parsed = NhsNumber.parse(text)
    except InvalidNhsNumber as exc:
        digits = text.replace(" ", "").replace("-", "")
        assert len(digits) < 4 or digits not in str(exc)
    else:
        assert len(parsed) == 10 and parsed.isdigit()


def test_spaces_and_hyphens_are_stripped() -> None:
    assert NhsNumber.parse("943 476 5919") == "9434765919"
    assert NhsNumber.parse("999-000-0018") == "9990000018"


def test_known_values() -> None:
    assert [str(n) for n in itertools.islice(iter_test_numbers(), 3)] == ["9990000018", "9990000026", "9990000034"]
    for bad in ("9990000019", "999000001", "99900000180", "999000001a", "", "９９９００００018"):
        with pytest.raises(InvalidNhsNumber):
            NhsNumber.parse(bad)
    with pytest.raises(InvalidNhsNumber):
        NhsNumber.parse(9990000018)


def test_prefix_999000000_never_valid() -> None:
    for last in "0123456789":
        with pytest.raises(InvalidNhsNumber):
            NhsNumber.parse("999000000" + last)


def test_test_range_restriction() -> None:
    assert NhsNumber.parse("9434765919", test_range_only=False)
    with pytest.raises(InvalidNhsNumber, match="test-range"):
        NhsNumber.parse("9434765919", test_range_only=True)


def test_repr_hides_the_number() -> None:
    assert "999" not in repr(NhsNumber.parse("9990000018"))
