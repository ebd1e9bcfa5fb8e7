"""Logging: JSON lines (stdlib logging), request/trace ids from context, NHS numbers replaced by a keyed hash.

Event names form the log catalogue (``module.event``); message text is the event, details go in ``extra``.
The redaction filter is a safety net: code must not log NHS numbers or names in the first place.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import re
import sys
import traceback
from typing import Any

import orjson

from cpis_bridge.core.nhs import NhsTagger

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

# An NHS number as the service accepts one (NhsNumber.parse drops every space and hyphen) and as it reaches a log
# line: digits percent-encoded (%39) or JSON-escaped (\u0039, escaped again inside a JSON line), separated by any
# run of spaces, hyphens, '+' (a space in a query string) and their encodings (%20, %2D, %2B, \u0020, \u002d).
_DIGIT = r"(?:[0-9]|%3[0-9]|\\+u003[0-9])"
_SEPARATOR = r"(?:[ +-]|%2[0bBdD]|\\+u002[0bBdD])"
# Not part of a longer number; a digit that ends an escape of something else (\u0001, %01) does not count.
_BEFORE = r"(?:(?<![0-9])|(?<=\\u[0-9a-fA-F]{4})|(?<=%[0-9a-fA-F]{2}))"
NHS_PATTERN = re.compile(_BEFORE + _DIGIT + "(?:" + _SEPARATOR + "*" + _DIGIT + "){9}(?![0-9])")
_ATOM = re.compile(r"%3([0-9])|\\+u003([0-9])|%2[0bBdD]|\\+u002[0bBdD]|([0-9])|.", re.S)
_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def digits_of(text: str) -> str:
    """The digits a redacted match stands for, whatever their encoding."""
    return "".join(a or b or c for a, b, c in _ATOM.findall(text))


class Redactor:
    """Replaces every NHS number in a line by ``nhs#`` and its keyed hash: the same tag that names the child's Redis
    keys and stands in for the number in audit entries (``subjectTag``), so a log line can be matched to them."""

    def __init__(self, key: bytes) -> None:
        self._tagger = NhsTagger(key)

    def tag(self, nhs: str) -> str:
        return "nhs#" + self._tagger(digits_of(nhs))

    def __call__(self, text: str) -> str:
        return NHS_PATTERN.sub(lambda m: self.tag(m.group(0)), text)


def exception_text(exc_info: Any) -> str:
    """A traceback with the exception types but not their messages, which can quote input (a request line, a field
    value, a name); only the service's own errors and OS errors, written to hold no personal data, keep theirs."""
    _, exc, _ = exc_info
    parts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        kind = type(exc)
        name = f"{kind.__module__}.{kind.__qualname__}"
        if isinstance(exc, OSError) or kind.__module__.startswith("cpis_bridge."):
            name += f": {exc}"
        frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
        parts.append(f"Traceback (most recent call last):\n{frames}{name}")
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return "\n\nwhich caused:\n".join(reversed(parts))


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
            out["exc"] = exception_text(record.exc_info)
        text = orjson.dumps(out, default=str).decode()
        return self.redact(text)


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        # ISO 8601 with a 'T': "2026-12-03 16:09" would read as ten digits in groups to the redaction.
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z")
        self.redact = redact

    def formatException(self, ei: Any) -> str:
        return exception_text(ei)

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")}
        base = super().format(record)
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return self.redact(base)


def configure(level: str, fmt: str, hash_key: bytes) -> Redactor:
    """One handler on the root logger, redacting the whole formatted line (message, extras, traceback) of every
    record of every logger (aiohttp's, asyncio's, warnings, uncaught exceptions included)."""
    redact = Redactor(hash_key)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and not name.startswith("cpis_bridge"):
            for h in list(logger.handlers):  # a library's own handler would print unredacted: records go to root
                logger.removeHandler(h)
            logger.propagate = True
    logging.captureWarnings(True)
    crashed = logging.getLogger("cpis_bridge.crash")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        crashed.critical("process.uncaught", exc_info=(kind, exc, tb))

    sys.excepthook = excepthook
    return redact
