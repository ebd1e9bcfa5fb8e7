"""Property-based fuzzing of the care-setting FHIR API and CDS Hooks on the running app: arbitrary
query strings, headers, bodies, ids, content types and sizes never give a 5xx; /fhir errors are OperationOutcomes and
never hold an NHS number. Hypothesis drives the app from a worker thread (the app keeps its own event loop)."""

from __future__ import annotations

import asyncio
import json
import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import pytest
from fhir.resources.R4B.encounter import Encounter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from cpis_bridge.app import create_app
from tests.support.world import ED, LA1, record

T = TypeVar("T")
TIMEOUT = 10.0
MiB = 1024 * 1024
NHS_SYS = "https://fhir.nhs.uk/Id/nhs-number"
CHILD = "9990000018"  # has a visible record in every test here
OTHER = "9990000026"  # valid, no record
FHIR_CT = "application/fhir+json"
INCLUDE_ASSIGNED = "AuditEvent:entity-type=http://terminology.hl7.org/CodeSystem/v3-RoleClass|ASSIGNED"
FUZZ = settings(
    max_examples=100, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
FEW = settings(FUZZ, max_examples=50)
TEN_DIGITS = re.compile(r"\d{10}")


# -- plumbing: raw HTTP to the test server, hypothesis in a worker thread -------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = dechunk(body)
    elif "Content-Length" in headers:
        body = body[: int(headers["Content-Length"])]
    return Reply(status, headers, body)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One answer: its head, then its Content-Length bytes (or chunks, or up to EOF). It does not wait for the server
    to close: an answer given before a body was read may leave the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    reply = parse_reply(head)
    if "Content-Length" in reply.headers:
        return head + await reader.readexactly(int(reply.headers["Content-Length"]))
    if reply.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return head + await reader.readuntil(b"\r\n0\r\n\r\n")
    return head + await reader.read()


class App:
    """The app under test (aiohttp_client over create_app, relays off) driven by raw HTTP/1.1 over loopback, so
    request lines, header bytes and bodies go out exactly as generated."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.port: int = client.server.port
        self.loop = asyncio.get_running_loop()

    def run(self, coro: Awaitable[T]) -> T:
        """From the hypothesis thread: run a coroutine on the app's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=TIMEOUT * 2)  # type: ignore[arg-type]

    async def raw(
        self,
        method: str,
        target: bytes | str,
        headers: dict[str, str | bytes] | None = None,
        body: bytes = b"",
        *,
        half_close: bool = False,
        content_length: int | None = None,
    ) -> Reply:
        target_b = target.encode("ascii") if isinstance(target, str) else target
        lines = [method.encode() + b" " + target_b + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
        for name, value in (headers or {}).items():
            lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode("utf-8")))
        if body or method in ("POST", "PUT") or content_length is not None:
            lines.append(b"Content-Length: " + str(len(body) if content_length is None else content_length).encode())
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), TIMEOUT)
        try:
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            await writer.drain()
            if half_close:
                writer.write_eof()
            data = await asyncio.wait_for(read_reply(reader), TIMEOUT)
        finally:
            writer.close()
        return parse_reply(data)

    def call(
        self,
        method: str,
        target: bytes | str,
        headers: dict[str, str | bytes] | None = None,
        body: bytes = b"",
        **kw: Any,
    ) -> Reply:
        return self.run(self.raw(method, target, headers, body, **kw))

    async def server_errors(self) -> list[str]:
        """Every 5xx the app counted (cpis_http_requests_total), also for answers the client never read."""
        r = await self.raw("GET", "/metrics")
        return [
            line
            for line in r.text.splitlines()
            if line.startswith("cpis_http_requests_total{") and re.search(r'status="5\d\d"', line)
        ]


@pytest.fixture
async def app(aiohttp_client: Any, make_settings: Callable[..., Any]) -> Any:
    client = await aiohttp_client(create_app(make_settings(relays=False)))
    r = await client.put("/v1/records/FZ-1", json=record("FZ-1", nhs=CHILD), headers=LA1)
    assert r.status == 201, await r.text()
    fuzz = App(client)
    yield fuzz
    assert await fuzz.server_errors() == []


async def in_thread(fn: Callable[[], None]) -> None:
    await asyncio.wait_for(asyncio.to_thread(fn), 60)


def assert_outcome(r: Reply, status: int | tuple[int, ...]) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status in statuses, (r.status, r.text[:400])
    assert r.content_type == FHIR_CT, (r.headers, r.text[:200])
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"], body
    assert body["issue"][0]["severity"] in ("error", "fatal", "warning", "information")
    assert not TEN_DIGITS.search(r.text), r.text[:400]  # never an NHS number (or any 10-digit run) in an error
    return body


def no_nhs_echo(sent: str, r: Reply) -> None:
    for digits in set(TEN_DIGITS.findall(sent)):
        assert digits not in r.text, (digits, r.text[:400])


# -- strategies -----------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
nhs_like = st.sampled_from(
    [
        CHILD,
        OTHER,
        "9990000017",
        "999000001",
        "99900000180",
        "4010232137",
        "999 000 0018",
        "",
        "ABCDEFGHIJ",
        "\uff19\uff19\uff19\uff10\uff10\uff10\uff10\uff10\uff11\uff18",
        "9990000018\x00",
        " 9990000018",
    ]
)
any_text = st.text(max_size=40)  # any code points (encoded as UTF-8 on the wire)


def enc(text: str, how: int) -> str:
    if how == 0:
        return quote(text, safe="")
    if how == 1:
        return quote_plus(text, safe=":|")
    return quote(text, safe=":|/=,;+!$'()*@?")  # leave URL-legal delimiters raw


ODD = st.sampled_from(
    ["%", "%zz", "%FF", "%C3", "%00", "%0A", "%E2%82", "&", "&&", "=", "==", ";", "+", "%2526", "%u0041", "?"]
)
# Request lines stay within the HTTP parser's 8 KiB limit (5 parameters of at most ~1.2 KB each).
param_names = (
    st.sampled_from(
        [
            "patient:identifier",
            "patient",
            "_include",
            "_format",
            "_count",
            "identifier",
            "patient:identifier:exact",
            "Patient:identifier",
            "_id",
            "subject",
            "",
            "patient:identifier\x00",
            "patient%3Aidentifier",
        ]
    )
    | any_text
)
systems = st.sampled_from(
    [
        NHS_SYS,
        NHS_SYS + "/",
        NHS_SYS.upper(),
        "http://fhir.nhs.uk/Id/nhs-number",
        "",
        "urn:oid:2.16.840.1.113883.2.1.4.1",
        "|",
    ]
) | st.text(max_size=30)
patient_values = st.builds(
    lambda s, sep, n: s + sep + n,
    systems,
    st.sampled_from(["|", "||", "", " | ", "\u2223"]),
    nhs_like | any_text | st.text("0123456789", min_size=11, max_size=1200),
)
param_values = (
    patient_values
    | any_text
    | st.text(string.ascii_letters, min_size=1000, max_size=1200)
    | st.sampled_from([INCLUDE_ASSIGNED, "AuditEvent:agent", "json", "xml", FHIR_CT, "*"])
)
queries = st.lists(
    st.tuples(param_names, param_values, st.integers(0, 2), st.booleans()) | ODD,
    max_size=5,
).map(
    lambda parts: "&".join(
        p if isinstance(p, str) else (enc(p[0], p[2]) + ("=" + enc(p[1], p[2]) if p[3] else "")) for p in parts
    )
)


def valid_query(nhs: str = CHILD) -> str:
    return "patient:identifier=" + quote(f"{NHS_SYS}|{nhs}", safe=":/")


# -- searches: arbitrary query strings -------------------------------------------------------------------------------


@pytest.mark.parametrize("resource", ["CareTeam", "Flag", "AuditEvent"])
async def test_search_any_query_string(app: App, resource: str) -> None:
    seen: set[int] = set()

    @FUZZ
    @given(query=queries | st.just(valid_query()))
    def prop(query: str) -> None:
        r = app.call("GET", f"/fhir/{resource}?{query}", ED)
        seen.add(r.status)
        # 406: a _format that is neither JSON nor XML (FHIR's answer to a format the server does not serve)
        assert r.status in (200, 400, 406), (r.status, query, r.text[:300])
        if r.content_type == "application/fhir+xml":  # the query asked for XML: the same answer, as FHIR XML
            root = "Bundle" if r.status == 200 else "OperationOutcome"
            assert r.text.lstrip().startswith("<") and f"<{root} " in r.text, r.text[:300]
            if r.status != 200:
                no_nhs_echo(query, r)
        elif r.status != 200:
            assert_outcome(r, r.status)
            no_nhs_echo(query, r)
        else:
            assert r.content_type == FHIR_CT and r.json()["resourceType"] == "Bundle"

    await in_thread(prop)
    assert {200, 400} <= seen  # the fuzz reached both the handler's success path and its refusals


async def test_search_repeated_parameters_are_400(app: App) -> None:
    def prop() -> None:
        for resource in ("CareTeam", "Flag", "AuditEvent"):
            r = app.call("GET", f"/fhir/{resource}?{valid_query()}&{valid_query(OTHER)}", ED)
            assert_outcome(r, 400)
            assert OTHER not in r.text and CHILD not in r.text

    await in_thread(prop)


# -- headers: IsUnscheduledAccessEvent and TraceID -------------------------------------------------------------------

header_bytes = st.binary(max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b)
trace_ids = (
    st.text(st.characters(exclude_characters="\r\n"), max_size=300).map(lambda s: s.encode("utf-8"))
    | header_bytes
    | st.text(string.printable.strip(), min_size=129, max_size=6000).map(str.encode)
    | st.sampled_from(
        [
            b"\x00",
            b"\x7f",
            b"\x1b[31m",
            b"\xff\xfe",
            b"\xed\xa0\x80",
            "é".encode("latin-1"),
            "🚑-trace".encode(),
            b"\t",
            b" a b ",
        ]
    )
)
unscheduled = (
    st.sampled_from(
        [
            b"true",
            b"false",
            b"TRUE",
            b" false ",
            b"",
            b"yes",
            b"1",
            b"0",
            b"null",
            b"true,false",
            b"faux",
            "vrai\u00e9".encode(),
        ]
    )
    | header_bytes
)


def is_field_text(value: bytes) -> bool:
    """What RFC 9110 allows in a field value (VCHAR, SP, HTAB, obs-text); anything else the parser may refuse."""
    return all(b in (9, 32) or 33 <= b <= 126 or b >= 128 for b in value)


@FUZZ
@given(trace=trace_ids | st.none(), flag=unscheduled | st.none(), resource=st.sampled_from(["CareTeam", "Flag"]))
def _header_case(app: App, trace: bytes | None, flag: bytes | None, resource: str) -> None:
    headers: dict[str, str | bytes] = dict(ED)
    if trace is not None:
        headers["TraceID"] = trace
    if flag is not None:
        headers["IsUnscheduledAccessEvent"] = flag
    r = app.call("GET", f"/fhir/{resource}?{valid_query()}", headers)
    assert r.status in (200, 400), (r.status, trace, flag, r.text[:300])
    sent_ok = all(v is None or is_field_text(v) for v in (trace, flag))
    if r.status == 400 and sent_ok:
        assert_outcome(r, 400)  # the app's refusal (a bad IsUnscheduledAccessEvent), not the HTTP parser's
    if r.status == 200:
        assert r.json()["resourceType"] == "Bundle"
        flag_text = (flag or b"").strip().lower()
        assert flag_text in (b"", b"true", b"false"), flag
    echoed = r.headers.getall("TraceID", [])
    assert len(echoed) <= 1
    # echoed as sent, cut to 128 characters, without control characters and with undecodable bytes as U+FFFD
    expected = "".join(c for c in (trace or b"").decode("utf-8", "replace").strip(" \t") if c.isprintable())[:128]
    if echoed:
        value = echoed[0].encode("latin-1")  # the bytes as sent back
        assert all(b == 32 or 33 <= b <= 126 or b >= 128 for b in value), value  # no control characters
        assert value.decode("utf-8") == expected, (value, trace)
    elif r.status == 200:
        assert not expected, ("a TraceID must be echoed", trace)


async def test_headers_trace_id_and_unscheduled_flag(app: App) -> None:
    await in_thread(lambda: _header_case(app))  # type: ignore[call-arg]


# -- POST /fhir/Encounter ------------------------------------------------------------------------------------------


def encounter(value: str = "att-1", nhs: str = CHILD) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "identifier": [{"system": "https://ed.example/Id/attendance", "value": value}],
        "status": "arrived",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
        "subject": {"identifier": {"system": NHS_SYS, "value": nhs}},
        "period": {"start": "2026-11-22T02:10:00+00:00"},
    }


PATHS = {  # where a perturbation lands: a key path into the Encounter
    "identifier": ("identifier",),
    "identifier.value": ("identifier", 0, "value"),
    "identifier.system": ("identifier", 0, "system"),
    "status": ("status",),
    "class": ("class",),
    "class.code": ("class", "code"),
    "subject": ("subject",),
    "subject.identifier": ("subject", "identifier"),
    "subject.identifier.system": ("subject", "identifier", "system"),
    "subject.identifier.value": ("subject", "identifier", "value"),
    "period": ("period",),
    "period.start": ("period", "start"),
    "period.end": ("period", "end"),
    "resourceType": ("resourceType",),
}
garbage_dates = (
    st.sampled_from(
        [
            "2026-13-45",
            "yesterday",
            CHILD,
            "",
            "2026-11-22T25:00:00Z",
            "2026",
            "2026-11-22T02:10:00",
            "0000-00-00",
            "2026-02-30",
            "T",
            "2026-11-22T02:10:00+99:00",
        ]
    )
    | st.integers(-(10**12), 10**12)
    | st.floats(-1e12, 1e12)
)
field_values = (
    garbage_dates
    | json_values
    | nhs_like
    | st.integers(9990000000, 9999999999)
    | st.text(max_size=3000)
    | st.lists(json_values, min_size=100, max_size=3000)
)
perturbation = st.one_of(
    st.tuples(st.just("del"), st.sampled_from(sorted(PATHS)), st.none()),
    st.tuples(st.just("set"), st.sampled_from(sorted(PATHS)), field_values),
    st.tuples(
        st.just("extra"),
        st.text(max_size=20)
        | st.sampled_from(["_status", "reasonCode", "id", CHILD, "contained", "fhir_comments", "meta"]),
        json_values | st.lists(st.just({"text": "x"}), max_size=20000),
    ),
    st.tuples(
        st.just("many"),
        st.sampled_from(["identifier", "reasonCode", "participant", "location"]),
        st.integers(100, 40000),
    ),
)


def perturb(body: dict[str, Any], changes: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    for kind, where, value in changes:
        if kind == "extra":
            body[where] = value
            continue
        if kind == "many":
            body[where] = [
                {"system": "https://ed.example/Id/attendance", "value": f"v{i}"} if where == "identifier" else {}
                for i in range(value)
            ]
            continue
        path = PATHS[where]
        node: Any = body
        for step in path[:-1]:
            try:
                node = node[step]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int) and len(node) > path[-1]):
            if kind == "del":
                if isinstance(node, dict):
                    node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    return body


def check_encounter_answer(app: App, sent: bytes, r: Reply, ok: bool = True) -> None:
    assert r.status in (200, 201, 400, 413, 415, 422), (r.status, r.text[:400])
    if r.status >= 400:
        body = assert_outcome(r, r.status)
        no_nhs_echo(sent.decode("utf-8", "replace"), r)
        if r.status == 422:
            issue = body["issue"][0]
            assert issue.get("expression") or "Encounter" in issue["diagnostics"], body
            assert all(e.startswith("Encounter") for e in issue.get("expression", [])), body
        return
    assert r.content_type == FHIR_CT
    out = r.json()
    if r.status == 201:
        assert out["resourceType"] == "Encounter" and out["id"]
        assert r.headers["Location"].endswith(f"/fhir/Encounter/{out['id']}")
        assert set(out) <= {
            "resourceType",
            "id",
            "meta",
            "identifier",
            "status",
            "class",
            "subject",
            "period",
            "serviceProvider",
        }
        Encounter.model_validate(out)  # what is retained and answered is itself valid R4
        assert all(isinstance(v, str) for v in out["period"].values()), out["period"]
        again = app.call("GET", f"/fhir/Encounter/{out['id']}", ED)
        assert again.status == 200 and again.json() == out
    else:
        assert out["resourceType"] in ("Encounter", "OperationOutcome"), out


def post_encounter(app: App, body: bytes, content_type: str = FHIR_CT, **kw: Any) -> Reply:
    return app.call("POST", "/fhir/Encounter", {**ED, "Content-Type": content_type}, body, **kw)


@FUZZ
@given(
    body=json_values
    | st.dictionaries(st.text(max_size=12), json_values, max_size=6).map(lambda d: {**d, "resourceType": "Encounter"})
)
def _any_json_case(app: App, body: Any) -> None:
    sent = json.dumps(body).encode()
    check_encounter_answer(app, sent, post_encounter(app, sent))


async def test_encounter_any_json(app: App) -> None:
    await in_thread(lambda: _any_json_case(app))  # type: ignore[call-arg]


@FUZZ
@given(
    changes=st.lists(perturbation, min_size=1, max_size=4), value=st.text(string.ascii_letters, min_size=1, max_size=12)
)
def _perturbed_case(app: App, changes: list[tuple[str, Any, Any]], value: str) -> None:
    body = perturb(encounter(value), changes)
    sent = json.dumps(body).encode()
    r = post_encounter(app, sent)
    check_encounter_answer(app, sent, r)
    if len(sent) > MiB:
        assert r.status == 413


async def test_encounter_perturbed(app: App) -> None:
    await in_thread(lambda: _perturbed_case(app))  # type: ignore[call-arg]


async def test_encounter_named_fields(app: App) -> None:
    """Each single defect is named by its FHIRPath in issue.expression, and the NHS number never comes back."""
    cases: list[tuple[list[tuple[str, Any, Any]], str]] = [
        ([("del", "identifier", None)], "Encounter.identifier"),
        ([("set", "subject.identifier.system", "https://ehr.example/Id/mrn")], "Encounter.subject.identifier"),
        ([("del", "subject", None)], "Encounter.subject.identifier"),
        ([("set", "subject.identifier.value", "9990000017")], "Encounter.subject.identifier.value"),
        ([("set", "subject.identifier.value", "4010232137")], "Encounter.subject.identifier.value"),
        ([("set", "period.start", "yesterday")], "Encounter.period.start"),
        ([("set", "period.start", CHILD)], "Encounter.period.start"),
        ([("del", "period", None)], "Encounter.period.start"),
        ([("set", "status", 7)], "Encounter.status"),
        ([("set", "class", "EMER")], "Encounter.class"),
        ([("set", "period.start", 20261122)], "Encounter.period.start"),  # not epoch seconds: a dateTime string
        ([("set", "period.end", 5)], "Encounter.period.end"),
        ([("extra", "unknownThing", {"x": CHILD})], "Encounter.unknownThing"),
    ]

    def run() -> None:
        for changes, field in cases:
            sent = json.dumps(perturb(encounter(), changes)).encode()
            r = post_encounter(app, sent)
            body = assert_outcome(r, 422)
            assert field in body["issue"][0].get("expression", []), (field, body)
            no_nhs_echo(sent.decode(), r)

    await in_thread(run)


@FUZZ
@given(body=st.binary(max_size=500), content_type=st.sampled_from([FHIR_CT, "application/json"]))
def _bytes_case(app: App, body: bytes, content_type: str) -> None:
    r = post_encounter(app, body, content_type)
    try:
        json.loads(body)
        parses = True
    except ValueError:
        parses = False
    if parses:
        check_encounter_answer(app, body, r)
    else:
        assert_outcome(r, 400)


async def test_encounter_any_bytes(app: App) -> None:
    await in_thread(lambda: _bytes_case(app))  # type: ignore[call-arg]


content_types = st.sampled_from(
    [
        "text/plain",
        "application/xml",
        "application/fhir+xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "text/json",
        "",
        "application/octet-stream",
        "*/*",
        "application/json+fhir",
        "application/fhir+json; charset=utf-8",
        "APPLICATION/FHIR+JSON",
        "json",
        "application/json; fhirVersion=4.0",
    ]
) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@FEW
@given(content_type=content_types)
def _content_type_case(app: App, content_type: str) -> None:
    sent = json.dumps(encounter("ct-1")).encode()
    r = post_encounter(app, sent, content_type)
    mime = content_type.split(";")[0].strip().lower()
    if mime in (FHIR_CT, "application/json"):
        check_encounter_answer(app, sent, r)
        assert r.status in (200, 201)
    else:
        assert r.status in (400, 415), (r.status, content_type)  # 400: a header the HTTP parser refuses
        if r.status == 415:
            assert_outcome(r, 415)


async def test_encounter_wrong_content_types(app: App) -> None:
    await in_thread(lambda: _content_type_case(app))  # type: ignore[call-arg]


# -- GET /fhir/Encounter/{id} ----------------------------------------------------------------------------------------

ids = (
    st.text(max_size=80)
    | st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=100)
    | st.sampled_from(["..", ".", "%2F", "%", "%00", "a%2Fb", "x" * 5000, CHILD, "00000000-0000-0000-0000"])
)


@FUZZ
@given(encounter_id=ids, raw=st.booleans(), query=st.none() | queries)
def _read_case(app: App, encounter_id: str, raw: bool, query: str | None) -> None:
    path = quote(encounter_id, safe="%" if raw else "")
    target = f"/fhir/Encounter/{path}" + ("" if query is None else f"?{query}")
    r = app.call("GET", target, ED)
    assert r.status in (400, 404), (r.status, target, r.text[:300])
    assert_outcome(r, (400, 404))
    no_nhs_echo(target, r)


async def test_encounter_read_any_id(app: App) -> None:
    await in_thread(lambda: _read_case(app))  # type: ignore[call-arg]


# -- CDS Hooks -------------------------------------------------------------------------------------------------------


def hook(name: str = "encounter-start", nhs: str = CHILD) -> dict[str, Any]:
    return {
        "hook": name,
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "PractitionerRole/pr-1", "patientId": "pat-1", "encounterId": "enc-1"},
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": "pat-1", "identifier": [{"system": NHS_SYS, "value": nhs}]}
        },
    }


HOOK_PATHS = {
    "hook": ("hook",),
    "hookInstance": ("hookInstance",),
    "context": ("context",),
    "context.patientId": ("context", "patientId"),
    "context.encounterId": ("context", "encounterId"),
    "prefetch": ("prefetch",),
    "prefetch.patient": ("prefetch", "patient"),
    "prefetch.patient.resourceType": ("prefetch", "patient", "resourceType"),
    "prefetch.patient.identifier": ("prefetch", "patient", "identifier"),
    "identifier[0]": ("prefetch", "patient", "identifier", 0),
    "identifier.system": ("prefetch", "patient", "identifier", 0, "system"),
    "identifier.value": ("prefetch", "patient", "identifier", 0, "value"),
    "fhirServer": ("fhirServer",),
    "fhirAuthorization": ("fhirAuthorization",),
}
hook_values = (
    json_values
    | nhs_like
    | st.integers(9990000000, 9999999999)
    | st.text(max_size=500)
    | st.sampled_from(
        [
            "patient-view",
            "encounter-start",
            "order-sign",
            "http://127.0.0.1:9/fhir",
            "https://127.0.0.1:9",
            "http://[::1",
            "http://127.0.0.1:99999/x",
            "http://",
            {"access_token": "a\nb"},
            {"access_token": 5},
            "Patient",
        ]
    )
)
hook_change = st.tuples(st.sampled_from(["del", "set"]), st.sampled_from(sorted(HOOK_PATHS)), hook_values)
service_ids = st.sampled_from(["cpis-patient-view", "cpis-encounter-start"]) | st.text(max_size=30)


def perturb_hook(body: dict[str, Any], changes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    for kind, where, value in changes:
        path = HOOK_PATHS[where]
        node: Any = body
        for step in path[:-1]:
            try:
                node = node[step]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        last = path[-1]
        if isinstance(node, dict):
            if kind == "del":
                node.pop(last, None)
            else:
                node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and len(node) > last:
            if kind == "del":
                node.pop(last)
            else:
                node[last] = value
    return body


@FUZZ
@given(
    service=service_ids,
    name=st.sampled_from(["encounter-start", "patient-view"]),
    changes=st.lists(hook_change, max_size=4),
    any_body=st.none() | json_values,
)
def _cds_case(app: App, service: str, name: str, changes: list[tuple[str, str, Any]], any_body: Any) -> None:
    body = any_body if any_body is not None else perturb_hook(hook(name), changes)
    sent = json.dumps(body)
    r = app.call(
        "POST", f"/cds-services/{quote(service, safe='')}", {**ED, "Content-Type": "application/json"}, sent.encode()
    )
    assert r.status in (200, 400, 404, 412, 415, 422), (r.status, sent[:300], r.text[:300])
    no_nhs_echo(sent, r)
    if r.status == 200:
        cards = r.json()["cards"]
        assert isinstance(cards, list)
        assert all(c["indicator"] == "warning" and c["source"]["label"] for c in cards)
    elif r.headers.get("Content-Type", "").startswith("application/problem+json"):
        assert r.json()["status"] == r.status


async def test_cds_any_request(app: App) -> None:
    await in_thread(lambda: _cds_case(app))  # type: ignore[call-arg]


@FEW
@given(body=st.binary(max_size=400), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def _cds_bytes_case(app: App, body: bytes, content_type: str) -> None:
    r = app.call("POST", "/cds-services/cpis-encounter-start", {**ED, "Content-Type": content_type}, body)
    assert r.status in (200, 400, 412, 415), (r.status, r.text[:300])
    if content_type != "application/json":
        assert r.status == 415


patients = st.fixed_dictionaries(
    {"resourceType": st.just("Patient")},
    optional={
        "id": json_values,
        "identifier": st.integers()
        | st.booleans()
        | st.floats(allow_nan=False)
        | json_values
        | st.lists(
            st.fixed_dictionaries(
                {}, optional={"system": st.just(NHS_SYS) | json_values, "value": nhs_like | json_values}
            )
            | json_values,
            max_size=4,
        ),
    },
)


@FUZZ
@given(patient=patients, name=st.sampled_from(["encounter-start", "patient-view"]))
def _cds_patient_case(app: App, patient: dict[str, Any], name: str) -> None:
    body = hook(name)
    body["prefetch"]["patient"] = patient
    sent = json.dumps(body)
    service = "cpis-" + name
    r = app.call("POST", f"/cds-services/{service}", {**ED, "Content-Type": "application/json"}, sent.encode())
    assert r.status == 200, (r.status, sent[:300], r.text[:300])  # a Patient was prefetched: cards, maybe none
    no_nhs_echo(sent, r)
    assert isinstance(r.json()["cards"], list)


async def test_cds_any_prefetched_patient(app: App) -> None:
    await in_thread(lambda: _cds_patient_case(app))  # type: ignore[call-arg]


@pytest.mark.parametrize("identifier", [5, True, 1.5, "abc", {"system": NHS_SYS, "value": CHILD}, None, [CHILD]])
async def test_cds_prefetch_identifier_shapes(app: App, identifier: Any) -> None:
    body = hook()
    body["prefetch"]["patient"]["identifier"] = identifier
    r = await app.raw(
        "POST",
        "/cds-services/cpis-encounter-start",
        {**ED, "Content-Type": "application/json"},
        json.dumps(body).encode(),
    )
    assert r.status == 200 and r.json() == {"cards": []}, r.text[:300]


async def test_cds_any_bytes(app: App) -> None:
    await in_thread(lambda: _cds_bytes_case(app))  # type: ignore[call-arg]


# -- sizes: oversized and truncated bodies --------------------------------------------------------------------------

BODY_ROUTES = [
    ("/fhir/Encounter", FHIR_CT),
    ("/cds-services/cpis-patient-view", "application/json"),
    ("/cds-services/cpis-encounter-start", "application/json"),
]


@pytest.mark.parametrize("path, content_type", BODY_ROUTES)
async def test_oversized_bodies_are_413(app: App, path: str, content_type: str) -> None:
    headers: dict[str, str | bytes] = {**ED, "Content-Type": content_type}
    for length in (MiB + 1, 2 * MiB, 10**12):  # announced only: refused on the header, before any body is read
        r = await app.raw("POST", path, headers, content_length=length)
        assert r.status == 413, (length, r.text[:300])
        if path.startswith("/fhir"):
            assert_outcome(r, 413)
    big = json.dumps({"resourceType": "Encounter", "note": "x" * (MiB + 10)}).encode()
    r = await app.raw("POST", path, headers, big)  # sent in full
    assert r.status == 413, r.text[:300]

    async def chunks() -> AsyncIterator[bytes]:  # 1.5 MiB sent chunked, without a Content-Length
        for _ in range(24):
            yield b" " * 65536

    r = await app.client.post(path, data=chunks(), headers=headers)
    assert r.status == 413, await r.text()
    if path.startswith("/fhir"):
        assert (await r.json())["resourceType"] == "OperationOutcome"


@FEW
@given(cut=st.floats(0, 1, exclude_max=True), path=st.sampled_from(BODY_ROUTES), half_close=st.booleans())
def _truncated_case(app: App, cut: float, path: tuple[str, str], half_close: bool) -> None:
    full = json.dumps(encounter("trunc-1") if path[0].startswith("/fhir") else hook()).encode()
    part = full[: int(len(full) * cut)]
    headers: dict[str, str | bytes] = {**ED, "Content-Type": path[1]}
    if half_close:  # announces the whole body, sends a part, then closes its side: no answer is owed
        try:
            r = app.call("POST", path[0], headers, part, half_close=True, content_length=len(full))
        except asyncio.IncompleteReadError:
            return  # the server closed without an answer
        assert r.status in (400, 413), r.text[:300]
        return
    r = app.call("POST", path[0], headers, part)  # a well-framed body cut short: not JSON
    assert r.status == 400, (r.status, part, r.text[:300])
    if path[0].startswith("/fhir"):
        assert_outcome(r, 400)
        no_nhs_echo(full.decode(), r)


async def test_truncated_bodies(app: App) -> None:
    await in_thread(lambda: _truncated_case(app))  # type: ignore[call-arg]
