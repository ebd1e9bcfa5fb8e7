"""Log lines replace NHS numbers (in any grouping) by a keyed hash: the same number gives the same tag under one
key, a different tag under another key, and the digits never appear."""

import io
import logging

import orjson

from cpis_bridge import log as logmod


def emit(key: bytes, message: str, **extra) -> dict:
    redact = logmod.Redactor(key)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logmod.JsonFormatter(redact))
    logger = logging.getLogger(f"test.redaction.{id(stream)}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug(message, extra=extra)
    finally:
        logger.removeHandler(handler)
    return orjson.loads(stream.getvalue())


def test_numbers_become_keyed_hashes_in_message_and_fields():
    line = emit(b"key-one", "looked up 9990000018", query="nhsNumber=999 000 0018", other="999-000-0026")
    text = orjson.dumps(line).decode()
    assert "9990000018" not in text and "999 000 0018" not in text and "999-000-0026" not in text
    tag = logmod.Redactor(b"key-one").tag("9990000018")
    assert line["event"] == f"looked up {tag}" and line["query"] == f"nhsNumber={tag}"
    assert tag.startswith("nhs#") and tag != logmod.Redactor(b"key-two").tag("9990000018")
    assert logmod.Redactor(b"key-one").tag("999 000 0018") == tag


def test_longer_digit_runs_are_left_alone():
    assert emit(b"k", "order 12345678901")["event"] == "order 12345678901"


def test_a_log_tag_is_the_tag_of_the_childs_keys():
    """One keyed hash: the tag a log line shows is the one naming the child's Redis keys and audit subjectTag."""
    import hashlib
    import hmac

    from cpis_bridge.store.keys import Keys

    keys = Keys("cpis", b"key-one")
    assert logmod.Redactor(b"key-one").tag("999 000 0018") == "nhs#" + keys.tag("9990000018")
    assert keys.tag("9990000018") == hmac.digest(b"key-one", b"9990000018", hashlib.sha256).hex()[:20]
    long_key = b"k" * 100  # longer than SHA-256's block: hashed first, as HMAC does
    assert Keys("cpis", long_key).tag("9990000018") == hmac.new(long_key, b"9990000018", "sha256").hexdigest()[:20]
