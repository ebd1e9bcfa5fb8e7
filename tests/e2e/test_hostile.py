"""Hostile input on every route of the router: hypothesis mutates each route's one valid request (from the
authorisation table) in its path parameters, query, headers and body (dates 0001-9999 in every date field, deep and
never-closing nesting, unicode and control characters, huge strings) and no answer is a 5xx. Then a property: extreme
values driven through every write path (PUT record, JSON/NDJSON/CSV uploads, Encounter POST, CDS hooks) are either
refused (4xx) or, when accepted, read back through every read path (record GET via its Location, list, the child's
accesses, every notifications page, CareTeam/Flag/AuditEvent searches, Encounter read, export)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpis_bridge.app import create_app
from cpis_bridge.compose import open_services
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.clock import today_london
from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.principal import Principal, Role
from tests.e2e.test_authz import PUBLIC, ROLES, TABLE, all_routes
from tests.e2e.test_fuzz_fhir import App, in_thread
from tests.support.world import ED, LA1, OPS, record

HOSTILE = settings(
    max_examples=100, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
READ_BACK = settings(HOSTILE, max_examples=20)
PER_ROUTE = settings(HOSTILE, max_examples=6)
CHILD = "9990000018"
NHS_Q = f"https://fhir.nhs.uk/Id/nhs-number|{CHILD}"
TODAY = today_london()
OPS_CTX = AuditContext(Principal(subject="ops-hostile", role=Role.OPS, ods="OPS"))
DATE_FIELDS = ("dateOfBirth", "startDate", "endDate", "deleteDate", "expectedDeliveryDate")

# -- strategies ------------------------------------------------------------------------------------------------------
near = [TODAY + dt.timedelta(days=d) for d in (-1, 0, 1, 365, 366, 5 * 365, 5 * 366 + 1)]
dates = (
    st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31))
    | st.sampled_from([dt.date(1, 1, 1), dt.date(1899, 12, 31), dt.date(1900, 1, 1), dt.date(9999, 12, 31), *near])
).map(dt.date.isoformat) | st.sampled_from(
    [
        "2026-W02-6",
        "2026-002",
        "20260102",
        "2026-1-2",
        "2026-02-30",
        "\uff12\uff10\uff12\uff16-01-02",
        "2026-01-02\n",
        " 2026-01-02",
        "",
    ]
)
offsets = st.sampled_from(
    [
        dt.UTC,
        dt.timezone(dt.timedelta(hours=1)),
        dt.timezone(dt.timedelta(hours=-1)),
        dt.timezone(dt.timedelta(hours=14)),
        dt.timezone(-dt.timedelta(hours=12, minutes=30)),
    ]
)
instants = st.datetimes(dt.datetime(1, 1, 1), dt.datetime(9999, 12, 31, 23, 59, 59), timezones=offsets).map(
    lambda t: t.isoformat()
) | st.sampled_from(
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "1900-01-01T00:00:00Z",
        "2026-11-21T22:05:00Z",
        "2026-11-21",
        "2026",
        "2026-11-21T22:05:00",
        "2026-11-21T25:00:00Z",
    ]
)
texts = (
    st.text(max_size=40)
    | st.text(st.characters(codec="utf-8"), max_size=20)
    | st.sampled_from(["\x00", "\x1f", "\x1e", "\u202e", "\ud7ff", "9990000018", "a/b", "..", "%2F", "{}", "[["])
    | st.integers(1000, 70_000).map(lambda n: "x" * n)
)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | texts | dates | instants
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
nesting = st.builds(
    lambda unit, n, close: unit * n + (b"]" * n if close else b""),
    st.sampled_from([b"[", b'{"a":', b'[{"a":', b'["]\\"",']),
    st.integers(30, 40_000),
    st.booleans(),
)


def mutate(value: Any, data: st.DataObject) -> Any:
    """The value with hostile replacements at some of its leaves (date-like fields get dates 0001-9999)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if data.draw(st.integers(0, 3)) == 0:
                continue
            strategy = dates if key in DATE_FIELDS else instants if key in ("start", "end") else json_values
            out[key] = data.draw(strategy) if data.draw(st.booleans()) else mutate(item, data)
        if data.draw(st.booleans()):
            out[data.draw(st.text(max_size=12))] = data.draw(json_values)
        return out
    if isinstance(value, list):
        return [mutate(v, data) for v in value]
    return data.draw(json_values) if data.draw(st.integers(0, 2)) == 0 else value


def hostile_segment(data: st.DataObject) -> str:
    text = data.draw(texts | st.sampled_from(["M-GET", "no-such-id", CHILD, "cpis-patient-view"]))
    return quote(text[:2000], safe="") or "x"


def hostile_query(data: st.DataObject) -> str:
    parts = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["nhsNumber", "patient:identifier", "after", "limit", "_include", "_format", "since", "date"]
                )
                | texts,
                texts
                | dates
                | instants.map(str)
                | st.integers().map(str)
                | st.sampled_from(["xml", "application/fhir+xml", "json"]),
            ),
            max_size=4,
        )
    )
    return "&".join(quote(k[:300], safe=":") + "=" + quote(v[:1200], safe=":|") for k, v in parts)


HEADER_NAMES = [
    "TraceID",
    "IsUnscheduledAccessEvent",
    "Content-Type",
    "Upload-Sequence",
    "Upload-Mode",
    "Upload-Record-Count",
    "Upload-Confirm-End",
    "Accept",
    "X-Correlation-ID",
    "If-Match",
]
header_values = (
    texts.map(lambda t: t.encode("utf-8", "surrogatepass")[:4000])
    | st.binary(max_size=60)
    | st.sampled_from([b"application/fhir+xml", b"application/xml", b"text/html", b"*/*"])
).map(lambda b: bytes(c for c in b if c not in b"\r\n") or b"x")


def _role_headers(allowed: frozenset[str]) -> dict[str, str]:
    role = "none" if allowed == PUBLIC else sorted(allowed)[0]
    return dict(ROLES[role])


@pytest.fixture
async def app(aiohttp_client: Any, make_settings: Any) -> Any:
    client = await aiohttp_client(create_app(make_settings(relays=False, upload_max_bytes=512 * 1024)))
    for lid in ("M-GET", "M-DEL"):
        assert (await client.put(f"/v1/records/{lid}", json=record(lid), headers=LA1)).status == 201
    fuzz = App(client)
    yield fuzz
    assert await fuzz.server_errors() == []


async def test_every_route_survives_hostile_input(app: App) -> None:
    routes = sorted({("GET", p) if m == "HEAD" else (m, p) for m, p in all_routes(app.client.app)})
    assert set(routes) <= set(TABLE), "a route without a row in the authorisation table"
    seen: set[tuple[str, str]] = set()

    def case(key: tuple[str, str], data: st.DataObject) -> None:
        method, template = key
        row = TABLE[key]
        path = row.path.split("?")[0]
        if "{" in template:  # replace the parameter segments of the concrete path
            tparts, pparts = template.split("/"), path.split("/")
            path = "/".join(
                hostile_segment(data) if t.startswith("{") and data.draw(st.booleans()) else p
                for t, p in zip(tparts, pparts, strict=True)
            )
        query = row.path.partition("?")[2]
        if data.draw(st.booleans()):
            query = hostile_query(data)
        headers: dict[str, str | bytes] = {**_role_headers(row.allowed), **row.headers}
        for name in data.draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=3, unique=True)):
            headers[name] = data.draw(header_values)
        body = b""
        if method in ("POST", "PUT"):
            headers.setdefault("Content-Type", "application/json")
            shape = data.draw(st.integers(0, 3))
            if shape == 0:
                body = data.draw(nesting)
            elif shape == 1 and row.json is not None:
                body = orjson.dumps(mutate(row.json, data), option=orjson.OPT_NON_STR_KEYS)
            else:
                body = json.dumps(data.draw(json_values)).encode("utf-8", "surrogatepass")
        target = path + ("?" + query if query else "")
        r = app.call(method, target, headers, body)
        assert r.status < 500, (method, target[:200], r.status, r.text[:300])
        seen.add(key)

    def for_route(key: tuple[str, str]) -> Any:
        @PER_ROUTE
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            case(key, data)

        return run

    def every_route() -> None:
        for key in routes:  # each route its own examples, so none goes untried
            for_route(key)()

    await in_thread(every_route)
    assert seen == set(routes)


# -- the read-back property -------------------------------------------------------------------------------------------


def assert_readable(app: App, settings: Any, accepted: dict[str, dict[str, Any]], encounters: list[str]) -> None:
    """Every read path answers 200 (or a plain 404) and holds what was accepted."""
    client = app.client
    for local_id, sent in accepted.items():
        r = app.run(client.get("/v1/records/" + quote(local_id, safe=""), headers=LA1))
        assert r.status == 200, (local_id, r.status)
        got = app.run(r.json())
        for field in DATE_FIELDS:
            assert got[field] == (sent.get(field) or None), (field, got, sent)
    for path, headers in [
        (f"/v1/records?nhsNumber={CHILD}", LA1),
        (f"/v1/children/{CHILD}/accesses", LA1),
        (f"/fhir/CareTeam?patient:identifier={quote(NHS_Q)}", {**ED, "IsUnscheduledAccessEvent": "false"}),
        (f"/fhir/Flag?patient:identifier={quote(NHS_Q)}", {**ED, "IsUnscheduledAccessEvent": "false"}),
        (f"/fhir/AuditEvent?patient:identifier={quote(NHS_Q)}", ED),
        (f"/v1/admin/audit?nhsNumber={CHILD}", OPS),
        *[(f"/fhir/Encounter/{eid}", ED) for eid in encounters],
    ]:
        r = app.run(client.get(path, headers=headers))
        assert r.status in (200, 404), (path, r.status)
        app.run(r.read())
    after: str | None = None
    for _ in range(50):  # every notifications page, to the end
        r = app.run(
            client.get("/v1/notifications", params={"limit": "50", **({"after": after} if after else {})}, headers=LA1)
        )
        assert r.status == 200, r.status
        page = app.run(r.json())
        if not page["notifications"]:
            break
        after = page["next"]

    async def export() -> None:
        async with open_services(settings) as opened:
            service = opened.retention
            data = await service.export(OPS_CTX, NhsNumber(CHILD))
        orjson.dumps(data)

    app.run(export())


def _upload_body(kind: str, records: list[dict[str, Any]], seq: int) -> tuple[bytes, dict[str, str]]:
    if kind == "json":
        body = {"sequence": seq, "mode": "delta", "recordCount": len(records), "records": records}
        return orjson.dumps(body), {"Content-Type": "application/json"}
    headers = {"Upload-Sequence": str(seq), "Upload-Mode": "delta"}
    if kind == "ndjson":
        return b"\n".join(orjson.dumps(r) for r in records), {**headers, "Content-Type": "application/x-ndjson"}
    out = io.StringIO()
    fields = sorted({k for r in records for k in r})
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for r in records:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return out.getvalue().encode(), {**headers, "Content-Type": "text/csv"}


LATEST = TODAY.replace(year=TODAY.year + 5, day=min(TODAY.day, 28))
EDGE = dt.date(1900, 1, 1)


@st.composite
def extreme_record(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly a valid record at the edges of every range (so it is accepted and must read back), sometimes any date
    0001-9999 or any text (so it must be refused cleanly)."""

    def day(low: dt.date, high: dt.date) -> str:
        edge = st.sampled_from([low, high]) | st.dates(low, high)
        return draw(edge.map(dt.date.isoformat) if draw(st.integers(0, 4)) else dates)

    start = draw(st.sampled_from([EDGE, TODAY]) | st.dates(EDGE, TODAY))
    plan = draw(st.sampled_from(["CPP", "LAC", "UCPP"]))
    rec: dict[str, Any] = {
        "localId": draw(st.sampled_from(["R-1", "R/2", "Zoë-3", "R 4", "%41", "😀", "x" * 64])),
        "planType": plan,
        "dateOfBirth": day(EDGE, TODAY),
        "startDate": start.isoformat(),
        "givenName": draw(
            st.text(st.characters(categories=["L", "M", "N", "P", "S", "Zs"]), min_size=1, max_size=100).filter(
                lambda t: t.strip() == t
            )
            if draw(st.integers(0, 3))
            else texts
        ),
    }
    if draw(st.booleans()):
        rec["endDate"] = day(start, LATEST)
    if draw(st.booleans()):
        rec["deleteDate"] = day(start, LATEST)
    if plan == "UCPP" and draw(st.booleans()):
        rec["expectedDeliveryDate"] = day(EDGE, TODAY + dt.timedelta(days=365))
    return rec


extreme_records = st.lists(extreme_record(), min_size=1, max_size=4)
now_ish = st.builds(
    lambda off, mins: (
        (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=mins)).astimezone(off).isoformat(timespec="seconds")
    ),
    offsets,
    st.integers(-60 * 24 * 365, 4),
)
periods = st.fixed_dictionaries(
    {"start": now_ish | st.just("1900-01-01T00:00:00Z") | instants}, optional={"end": now_ish | instants}
)


async def test_extreme_values_accepted_by_any_write_path_read_back_everywhere(app: App, settings: Any) -> None:
    sequence = itertools.count(1)

    @READ_BACK
    @given(
        recs=extreme_records,
        via=st.sampled_from(["put", "json", "ndjson", "csv"]),
        period=periods,
        cds_start=now_ish | instants,
        event=st.integers(0, 10**9),
    )
    def case(recs: list[dict[str, Any]], via: str, period: dict[str, str], cds_start: str, event: int) -> None:
        client = app.client
        accepted: dict[str, dict[str, Any]] = {}
        bodies = [{**record(r["localId"], nhs=CHILD), **r} for r in recs]
        if via == "put":
            for body in bodies:
                r = app.run(client.put("/v1/records/" + quote(body["localId"], safe=""), json=body, headers=LA1))
                assert r.status < 500, r.status
                if r.status in (200, 201):
                    accepted[body["localId"]] = body
                    assert r.headers["Location"].isascii()
        else:
            bodies = list({b["localId"]: b for b in bodies}.values())
            data, headers = _upload_body(via, bodies, next(sequence))
            r = app.run(client.post("/v1/uploads", data=data, headers={**LA1, **headers}))
            assert r.status < 500, r.status
            if r.status == 200:
                report = app.run(r.json())
                rejected = {x["index"] for x in report["rejections"]}
                accepted.update({b["localId"]: b for i, b in enumerate(bodies) if i not in rejected})
        encounters: list[str] = []
        enc = {
            "resourceType": "Encounter",
            "status": "arrived",
            "identifier": [{"system": "urn:test:hostile", "value": f"e-{event}"}],
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
            "subject": {"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": CHILD}},
            "period": period,
        }
        r = app.run(client.post("/fhir/Encounter", json=enc, headers={**ED, "Content-Type": "application/fhir+json"}))
        assert r.status < 500, r.status
        if r.status == 201:
            encounters.append(r.headers["Location"].rsplit("/", 1)[1])
        hook = {
            "hook": "encounter-start",
            "hookInstance": f"h-{event}",
            "context": {"userId": "Practitioner/1", "patientId": "p1", "encounterId": f"c-{event}"},
            "prefetch": {
                "patient": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": CHILD}],
                },
                "encounter": {"resourceType": "Encounter", "period": {"start": cds_start}},
            },
        }
        r = app.run(client.post("/cds-services/cpis-encounter-start", json=hook, headers=ED))
        assert r.status < 500, r.status
        assert_readable(app, settings, accepted, encounters)

    await in_thread(case)
