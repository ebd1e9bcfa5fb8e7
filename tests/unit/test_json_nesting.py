"""The nesting guard every JSON body passes before a parser sees it, checked against a character-by-character
reference on texts made of what matters (brackets, quotes, backslashes), with chunk boundaries anywhere."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cpis_bridge.web.common import nesting_within


def reference(text: bytes, limit: int) -> bool:
    if text.count(b"[") + text.count(b"{") <= limit:
        return True  # too few openers to be deep: left to the parser, which reports an unbalanced one itself
    depth, in_string, escaped = 0, False, False
    for byte in text:
        c = chr(byte)
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif in_string:
            in_string = c != '"'
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return False
        elif c in "]}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not in_string and not escaped


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b'"a":', b"[]"]), max_size=120),
    st.integers(1, 12),
    st.integers(1, 40),
)
def test_agrees_with_a_reference_scanner(parts: list[bytes], limit: int, chunk_size: int) -> None:
    text = b"".join(parts)
    assert nesting_within(text, limit, chunk_size=chunk_size) == reference(text, limit)


def test_deep_but_balanced_and_never_closing() -> None:
    assert nesting_within(b"[" * 32 + b"]" * 32, 32)
    assert not nesting_within(b"[" * 33 + b"]" * 33, 32)
    assert not nesting_within(b'{"a":' * 100_000, 32)
    assert nesting_within(b'["' + b"[" * 100 + b'"]', 32)
    assert not nesting_within(b'["' + b"[" * 100, 32)
