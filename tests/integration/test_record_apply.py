"""apply_records.lua against real Redis: versions, unchanged records, records stored in another layout, audit, and
uploads that span many batches (validated and applied batch by batch)."""

import tempfile

import orjson
import pytest

from cpis_bridge.app import KEYS, REDIS, create_app
from cpis_bridge.core.audit import AuditContext
from cpis_bridge.core.nhs import iter_test_numbers
from cpis_bridge.core.principal import Principal, Role
from cpis_bridge.services.uploads import BATCH, UploadMeta, UploadMode
from cpis_bridge.web.state import SERVICES
from tests.support.world import record

LA = "LA001"
NDJSON = "application/x-ndjson"


@pytest.fixture
async def app(aiohttp_client, settings):
    c = await aiohttp_client(create_app(settings))
    return c.app


def ctx() -> AuditContext:
    return AuditContext(Principal(subject="u-la", role=Role.LOCAL_AUTHORITY, ods=LA), trace_id="tr-1")


async def stored(app, nhs: str, local_id: str) -> dict:
    raw = await app[REDIS].hget(app[KEYS].records(app[KEYS].tag(nhs)), f"{LA}|{local_id}")
    return orjson.loads(raw)


async def test_versions_unchanged_and_changed(app):
    svc = app[SERVICES].records
    rec, created = await svc.put(ctx(), LA, "A", record("A"))
    assert created and rec.version == 1
    rec, created = await svc.put(ctx(), LA, "A", record("A"))
    assert not created and rec.version == 1  # identical: left alone
    rec, _ = await svc.put(ctx(), LA, "A", record("A", endDate="2026-02-01"))
    assert rec.version == 2 and rec.end_date is not None
    doc = await stored(app, "9990000018", "A")
    assert doc["v"] == 2 and doc["e"] == "2026-02-01" and doc["u"].endswith("Z")
    audit = await app[REDIS].lrange(app[KEYS].audit(app[KEYS].tag("9990000018")), 0, -1)
    assert len(audit) == 2  # one entry per write; the unchanged put wrote nothing


async def test_record_stored_in_another_layout_is_compared_field_by_field(app):
    svc, redis, keys = app[SERVICES].records, app[REDIS], app[KEYS]
    await svc.put(ctx(), LA, "A", record("A"))
    doc = await stored(app, "9990000018", "A")
    u, _ = doc.pop("u"), doc.pop("v")
    reordered = {"u": u, "v": 7, **dict(reversed(list(doc.items())))}
    await redis.hset(keys.records(keys.tag("9990000018")), f"{LA}|A", orjson.dumps(reordered))
    rec, _ = await svc.put(ctx(), LA, "A", record("A"))
    assert rec.version == 7  # same fields in another order: unchanged
    rec, _ = await svc.put(ctx(), LA, "A", record("A", planType="LAC"))
    assert rec.version == 8 and rec.plan_type.value == "LAC"


def ndjson(items: list[dict]):
    f = tempfile.TemporaryFile()
    f.write(b"\n".join(orjson.dumps(x) for x in items))
    f.seek(0)
    return f


async def test_upload_over_many_batches_then_full_reupload(app):
    svc, uploads = app[SERVICES].records, app[SERVICES].uploads
    numbers = [str(n) for _, n in zip(range(BATCH * 2 + 7), iter_test_numbers(), strict=False)]
    items = [record(f"L{i}", nhs) for i, nhs in enumerate(numbers)]
    items.insert(3, record("BAD", nhsNumber="123"))
    items.append(record("L0", numbers[0]))  # a repeat of a localId: rejected, the first one stays

    def meta(seq: int, mode: UploadMode) -> UploadMeta:
        return UploadMeta(sequence=seq, mode=mode, record_count=len(items))

    report, replayed = await uploads.apply_upload(ctx(), LA, meta(1, UploadMode.DELTA), NDJSON, ndjson(items))
    assert not replayed and report["fileCode"] == "CPF03"
    assert report["received"] == len(items) and report["accepted"] == len(numbers)
    assert [(r["index"], r["localId"]) for r in report["rejections"]] == [(3, "BAD"), (len(items) - 1, "L0")]
    assert len(await svc.store.index(LA)) == len(numbers)
    assert (await stored(app, numbers[-1], f"L{len(numbers) - 1}"))["v"] == 1
    # The same caseload again, minus two records, in full mode: nothing re-versioned, the two missing ones ended.
    again = [x for x in items if x["localId"] not in ("L5", "L600")]
    report, _ = await uploads.apply_upload(ctx(), LA, UploadMeta(2, UploadMode.FULL, len(again)), NDJSON, ndjson(again))
    assert report["accepted"] == len(numbers) - 2 and report["endedLocalIds"] == ["L5", "L600"]
    assert (await stored(app, numbers[7], "L7"))["v"] == 1
    ended = await stored(app, numbers[5], "L5")
    assert ended["v"] == 2 and "e" in ended
