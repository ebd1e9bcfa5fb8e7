"""Upload bodies: spool to a temporary file (never held whole in memory), then stream records out of JSON (ijson),
NDJSON or CSV. Any unreadable part raises UnreadableInput with code CPF01."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import ijson
import orjson
from aiohttp import web
from ijson.common import ObjectBuilder

from cpis_bridge.core.codes import FileCode
from cpis_bridge.core.errors import PayloadTooLarge, UnreadableInput, UnsupportedMediaType
from cpis_bridge.core.records import READ_ONLY_FIELDS, WRITABLE_FIELDS
from cpis_bridge.services.records import UploadMeta, parse_count, parse_mode, parse_sequence
from cpis_bridge.web.middlewares import size_text

CONTENT_TYPES = ("application/json", "application/x-ndjson", "text/csv")
CHUNK = 1 << 20


def _unreadable(detail: str) -> UnreadableInput:
    return UnreadableInput(detail, code=FileCode.UNREADABLE)


def meta_from_headers(request: web.Request) -> UploadMeta:
    """Sequence, mode and count for NDJSON/CSV uploads, from the Upload-* headers."""
    seq, mode = request.headers.get("Upload-Sequence"), request.headers.get("Upload-Mode")
    if seq is None or mode is None:
        raise _unreadable("NDJSON and CSV uploads need the Upload-Sequence and Upload-Mode headers")
    return UploadMeta(parse_sequence(seq), parse_mode(mode), parse_count(request.headers.get("Upload-Record-Count")))


def content_type(request: web.Request) -> str:
    ct = request.content_type
    if ct not in CONTENT_TYPES:
        raise UnsupportedMediaType("uploads are application/json, application/x-ndjson or text/csv")
    return ct


async def spool(request: web.Request, limit: int) -> IO[bytes]:
    """Copy the body to an anonymous temporary file, refusing it (413) as soon as it passes ``limit`` bytes."""
    tmp = tempfile.TemporaryFile()
    size = 0
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the upload is over the {size_text(limit)} limit")
            tmp.write(chunk)
    except BaseException:
        tmp.close()
        raise
    tmp.seek(0)
    return tmp


_TEXT_EVENTS = frozenset({"string", "map_key"})
_OPEN_EVENTS = frozenset({"start_map", "start_array"})
_CLOSE_EVENTS = frozenset({"end_map", "end_array"})
MAX_NESTING = 32  # envelope -> records -> record -> value is 3 levels; nothing legitimate comes near


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (JSON "\\ud800" escapes): they cannot be stored or answered."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_json(f: IO[bytes], meta: UploadMeta) -> Iterator[object]:
    """Records from ``{"sequence", "mode", "recordCount", "records": [...]}`` in one streaming pass."""
    builder: ObjectBuilder | None = None
    depth = 0
    nesting = 0
    seen_records = False
    try:
        for prefix, event, value in ijson.parse(f, use_float=True):
            if event in _OPEN_EVENTS:
                nesting += 1
                if nesting > MAX_NESTING:  # ijson's prefixes grow with depth: deep nesting would exhaust memory
                    raise _unreadable(f"the upload nests deeper than {MAX_NESTING} levels")
            elif event in _CLOSE_EVENTS:
                nesting -= 1
            if event in _TEXT_EVENTS and not value.isascii() and not _is_unicode(value):
                raise _unreadable("the upload holds text that is not valid Unicode (an unpaired surrogate escape)")
            if builder is not None:
                builder.event(event, value)
                if event in ("start_map", "start_array"):
                    depth += 1
                elif event in ("end_map", "end_array"):
                    depth -= 1
                    if depth == 0:
                        yield builder.value
                        builder = None
                continue
            if prefix == "records.item":
                if event in ("start_map", "start_array"):
                    builder = ObjectBuilder()
                    builder.event(event, value)
                    depth = 1
                else:
                    yield value
            elif prefix == "records":
                if event == "start_array":
                    seen_records = True
                elif event not in ("end_array",):
                    raise _unreadable("records must be an array")
            elif prefix == "sequence":
                meta.sequence = parse_sequence(value)
            elif prefix == "mode":
                meta.mode = parse_mode(value)
            elif prefix == "recordCount":
                meta.record_count = parse_count(value)
            elif prefix == "" and event not in ("start_map", "end_map", "map_key"):
                raise _unreadable("the upload must be a JSON object")
    except (ijson.JSONError, UnicodeDecodeError):  # the C backend decodes "\\ud800" escapes to invalid UTF-8
        raise _unreadable("the upload is not valid JSON") from None
    if not seen_records:
        raise _unreadable("the upload has no records array")


def iter_ndjson(f: IO[bytes]) -> Iterator[object]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            raise _unreadable(f"line {number} is not valid JSON") from None


def iter_csv(f: IO[bytes]) -> Iterator[object]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    try:
        reader = csv.reader(text, strict=True)
        header = next(reader, None)
        if header is None:
            raise _unreadable("the CSV file is empty: it needs a header row")
        header = [h.strip() for h in header]
        unknown = [h for h in header if h not in WRITABLE_FIELDS and h not in READ_ONLY_FIELDS]
        if unknown:
            raise _unreadable(f"unknown CSV column(s): {', '.join(unknown[:5])}")
        if len(set(header)) != len(header):
            raise _unreadable("the CSV header repeats a column")
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise _unreadable(
                    f"CSV line {reader.line_num} has {len(row)} fields; the header has {len(header)}"
                )
            record: dict[str, Any] = {k: v for k, v in zip(header, row, strict=True) if v != ""}
            yield record
    except csv.Error as exc:
        raise _unreadable(f"the CSV file is malformed: {exc}") from None
    except UnicodeDecodeError:
        raise _unreadable("the CSV file is not UTF-8 text") from None
    finally:
        text.detach()


def reader_for(ct: str, f: IO[bytes], meta: UploadMeta) -> Iterator[object]:
    f.seek(0)
    if ct == "application/json":
        return iter_json(f, meta)
    if ct == "application/x-ndjson":
        return iter_ndjson(f)
    return iter_csv(f)
