"""Upload bodies: spool to a temporary file (never held whole in memory), then stream records out of JSON (ijson),
NDJSON or CSV. Any unreadable part raises UnreadableInput with code CPF01."""

from __future__ import annotations

import csv
import io
import mmap
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import ijson
import orjson
from aiohttp import web

from cpis_bridge.core.codes import FileCode
from cpis_bridge.core.errors import PayloadTooLarge, UnreadableInput, UnsupportedMediaType
from cpis_bridge.core.records import READ_ONLY_FIELDS, WRITABLE_FIELDS
from cpis_bridge.services.uploads import UploadMeta, parse_count, parse_mode, parse_sequence
from cpis_bridge.web.common import MAX_NESTING, nesting_within
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


_META_KEYS = frozenset({"sequence", "mode", "recordCount"})


def read_json_meta(f: IO[bytes], meta: UploadMeta) -> None:
    """Check the envelope's shape and read sequence, mode and recordCount (one streaming pass of parse events).

    Stops as soon as the three meta keys and the start of ``records`` have all been seen (the usual order), so the
    records themselves are normally not walked here; they are built in C by :func:`iter_json`.
    """
    seen_records = False
    found: set[str] = set()
    in_records = False
    for prefix, event, value in ijson.parse(f, use_float=True):
        if in_records:
            if prefix == "records" and event == "end_array":
                in_records = False
            continue
        if prefix == "records":
            if event == "start_array":
                seen_records = in_records = True
            else:
                raise _unreadable("records must be an array")
        elif prefix in _META_KEYS:
            if prefix == "sequence":
                meta.sequence = parse_sequence(value)
            elif prefix == "mode":
                meta.mode = parse_mode(value)
            else:
                meta.record_count = parse_count(value)
            found.add(prefix)
        elif prefix == "" and event not in ("start_map", "end_map", "map_key"):
            raise _unreadable("the upload must be a JSON object")
        if seen_records and len(found) == len(_META_KEYS):
            return
    if not seen_records:
        raise _unreadable("the upload has no records array")


def iter_json(f: IO[bytes], meta: UploadMeta) -> Iterator[object]:
    """Records from ``{"sequence", "mode", "recordCount", "records": [...]}``: the envelope first
    (:func:`read_json_meta`), then the records built by ijson's C backend, which also checks the whole file."""
    f.seek(0, 2)
    if f.tell():
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if not nesting_within(m, MAX_NESTING):
                raise _unreadable(f"the upload is not valid JSON or nests deeper than {MAX_NESTING} levels")
    f.seek(0)
    try:
        read_json_meta(f, meta)
        f.seek(0)
        yield from ijson.items(f, "records.item", use_float=True)
    except (ijson.JSONError, UnicodeDecodeError):  # a lone surrogate escape is invalid UTF-8 to the C backend
        raise _unreadable("the upload is not valid JSON") from None


def iter_ndjson(f: IO[bytes]) -> Iterator[object]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        if not nesting_within(line, MAX_NESTING):
            raise _unreadable(f"line {number} is not valid JSON or nests deeper than {MAX_NESTING} levels")
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
                raise _unreadable(f"CSV line {reader.line_num} has {len(row)} fields; the header has {len(header)}")
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
