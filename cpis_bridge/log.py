"""Logging: JSON lines (stdlib logging), request/trace ids from context, NHS numbers replaced by a keyed hash.

Event names form the log catalogue (``module.event``); message text is the event, details go in ``extra``.
The redaction filter is a safety net: code must not log NHS numbers or names in the first place.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import hmac
import logging
import re
import sys
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

# 10 digits (optionally grouped 3-3-4 by spaces or hyphens), not part of a longer number.
NHS_PATTERN = re.compile(r"(?<![0-9])[0-9]{3}[ -]?[0-9]{3}[ -]?[0-9]{4}(?![0-9])")
_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class Redactor:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def tag(self, nhs: str) -> str:
        digits = re.sub(r"[ -]", "", nhs)
        return "nhs#" + hmac.new(self.key, digits.encode(), hashlib.sha256).hexdigest()[:12]

    def __call__(self, text: str) -> str:
        return NHS_PATTERN.sub(lambda m: self.tag(m.group(0)), text)


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        rid, tid = request_id_var.get(), trace_id_var.get()
        if rid:
            out["requestId"] = rid
        if tid:
            out["traceId"] = tid
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        text = orjson.dumps(out, default=str).decode()
        return self.redact(text)


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")}
        base = super().format(record)
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return self.redact(base)


def configure(level: str, fmt: str, hash_key: bytes) -> Redactor:
    redact = Redactor(hash_key)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return redact
