"""Batch uploads over HTTP: JSON/NDJSON/CSV, CPF/CPR codes, idempotent sequences, the full-upload safety rules."""

import orjson

from tests.support.world import LA1, LA2, record


def envelope(seq, records, mode="delta", count=None):
    body = {"sequence": seq, "mode": mode, "records": records}
    body["recordCount"] = len(records) if count is None else count
    return body


async def upload(client, body, headers=LA1):
    r = await client.post("/v1/uploads", json=body, headers=headers)
    return r.status, await r.json()


async def ids(client, nhs="9990000018", headers=LA1):
    r = await client.get("/v1/records", params={"nhsNumber": nhs}, headers=headers)
    return {x["localId"]: x for x in (await r.json())["records"]}


async def test_json_all_uploaded(client):
    status, rep = await upload(client, envelope(1, [record("A"), record("B", planType="LAC")]))
    assert status == 200
    assert rep["fileCode"] == "CPF02" and rep["accepted"] == 2 and rep["rejected"] == 0 and rep["received"] == 2
    assert set(await ids(client)) == {"A", "B"}


async def test_partial_with_per_record_codes(client):
    recs = [record("A"), record("B", nhsNumber="12345"), record("C", startDate="2999-01-01")]
    status, rep = await upload(client, envelope(1, recs))
    assert status == 200 and rep["fileCode"] == "CPF03" and rep["accepted"] == 1 and rep["rejected"] == 2
    assert [(x["index"], x["localId"], x["code"]) for x in rep["rejections"]] == [(1, "B", "CPR04"), (2, "C", "CPR07")]
    assert "startDate" in rep["rejections"][1]["detail"]


async def test_none_uploaded_does_not_use_sequence(client):
    status, rep = await upload(client, envelope(5, [record("A", nhsNumber="1")]))
    assert status == 200 and rep["fileCode"] == "CPF04"
    status, rep = await upload(client, envelope(5, [record("A")]))
    assert rep["fileCode"] == "CPF02"


async def test_unreadable_and_count_mismatch_apply_nothing(client):
    r = await client.post(
        "/v1/uploads",
        data=b'{"sequence": 1, "mode": "delta", "records": [',
        headers={**LA1, "Content-Type": "application/json"},
    )
    assert r.status == 422 and (await r.json())["code"] == "CPF01"
    status, rep = await upload(client, envelope(1, [record("A")], count=2))
    assert status == 422 and rep["code"] == "CPF01"
    assert await ids(client) == {}
    status, rep = await upload(client, {"mode": "delta", "records": [record("A")]})
    assert status == 422 and rep["code"] == "CPF01"
    status, rep = await upload(client, envelope(1, [record("A")], mode="sideways"))
    assert status == 422 and rep["code"] == "CPF01"
    # CPF01 does not use up the sequence.
    status, rep = await upload(client, envelope(1, [record("A")]))
    assert rep["fileCode"] == "CPF02"


async def test_replay_returns_stored_report_and_lower_unseen_is_conflict(client):
    _, first = await upload(client, envelope(10, [record("A")]))
    await client.put("/v1/records/A", json=record("A", endDate="2026-02-01"), headers=LA1)
    r = await client.post("/v1/uploads", json=envelope(10, [record("A")]), headers=LA1)
    assert r.status == 200 and await r.json() == first and r.headers.get("Upload-Replayed") == "true"
    assert (await ids(client))["A"]["endDate"] == "2026-02-01"  # not re-applied
    status, rep = await upload(client, envelope(9, [record("A")]))
    assert status == 409 and rep["status"] == 409
    # Another LA's sequences are its own.
    status, rep = await upload(client, envelope(3, [record("Q")]), headers=LA2)
    assert status == 200 and rep["fileCode"] == "CPF02"


async def test_full_upload_ends_absent_records_but_not_named_rejected_ones(client):
    await upload(client, envelope(1, [record("A"), record("B"), record("C"), record("D", endDate="2026-02-01")]))
    await client.put("/v1/records/OTHER", json=record("OTHER"), headers=LA2)
    status, rep = await upload(client, envelope(2, [record("A"), record("B", nhsNumber="999")], mode="full"))
    assert status == 200 and rep["fileCode"] == "CPF03"
    assert rep["ended"] == 1 and rep["endedLocalIds"] == ["C"]  # D already ended; B named (rejected); A present
    got = await ids(client)
    assert got["A"]["endDate"] is None and got["B"]["endDate"] is None
    assert got["C"]["endDate"] is not None and got["C"]["version"] == 2
    assert got["D"]["endDate"] == "2026-02-01"
    assert (await ids(client, headers=LA2))["OTHER"]["endDate"] is None  # never another LA's


async def test_full_upload_with_nothing_accepted_ends_nothing(client):
    await upload(client, envelope(1, [record("A")]))
    status, rep = await upload(client, envelope(2, [record("B", nhsNumber="1")], mode="full"))
    assert status == 200
    assert rep["fileCode"] == "CPF04" and rep["ended"] == 0
    assert (await ids(client))["A"]["endDate"] is None
    r = await client.post("/v1/uploads", data=b"garbage", headers={**LA1, "Content-Type": "application/json"})
    assert r.status == 422
    assert (await ids(client))["A"]["endDate"] is None


async def test_ndjson_and_csv(client):
    lines = b"\n".join(orjson.dumps(record(f"N{i}")) for i in range(3)) + b"\n"
    headers = {
        **LA1,
        "Content-Type": "application/x-ndjson",
        "Upload-Sequence": "1",
        "Upload-Mode": "delta",
        "Upload-Record-Count": "3",
    }
    r = await client.post("/v1/uploads", data=lines, headers=headers)
    assert r.status == 200 and (await r.json())["accepted"] == 3
    csv_body = (
        b"localId,planType,nhsNumber,dateOfBirth,startDate,endDate,lacLegalBasis\n"
        b"C1,LAC,9990000026,2015-01-01,2026-01-01,,s31\n"
        b"C2,CPP,9990000026,2015-01-01,2026-01-01,2026-03-01,\n"
    )
    headers = {**LA1, "Content-Type": "text/csv", "Upload-Sequence": "2", "Upload-Mode": "delta"}
    r = await client.post("/v1/uploads", data=csv_body, headers=headers)
    rep = await r.json()
    assert r.status == 200 and rep["fileCode"] == "CPF02", rep
    got = await ids(client, "9990000026")
    assert got["C1"]["lacLegalBasis"] == "s31" and got["C2"]["endDate"] == "2026-03-01"


async def test_bad_ndjson_csv_and_headers(client):
    base = {**LA1, "Upload-Sequence": "1", "Upload-Mode": "delta"}
    r = await client.post(
        "/v1/uploads", data=b'{"localId": "A"}\n{oops\n', headers={**base, "Content-Type": "application/x-ndjson"}
    )
    assert r.status == 422 and (await r.json())["code"] == "CPF01"
    r = await client.post("/v1/uploads", data=b"localId,reason\nA,x\n", headers={**base, "Content-Type": "text/csv"})
    assert r.status == 422 and (await r.json())["code"] == "CPF01"
    r = await client.post("/v1/uploads", data=b"localId,planType\nA\n", headers={**base, "Content-Type": "text/csv"})
    assert r.status == 422
    r = await client.post("/v1/uploads", data=b"{}\n", headers={**LA1, "Content-Type": "application/x-ndjson"})
    assert r.status == 422 and (await r.json())["code"] == "CPF01"
    r = await client.post("/v1/uploads", data=b"x", headers={**base, "Content-Type": "application/xml"})
    assert r.status == 415
    r = await client.post(
        "/v1/uploads", data=b"", headers={**base, "Content-Type": "text/csv", "Upload-Record-Count": "2"}
    )
    assert r.status == 422
    assert await ids(client) == {}


async def test_duplicate_local_id_in_one_upload(client):
    status, rep = await upload(client, envelope(1, [record("A"), record("A", planType="LAC")]))
    assert status == 200
    assert rep["fileCode"] == "CPF03" and rep["rejections"][0]["index"] == 1
    assert (await ids(client))["A"]["planType"] == "CPP"


async def test_upload_needs_la_role(client):
    from tests.support.world import ED

    r = await client.post("/v1/uploads", json=envelope(1, [record("A")]), headers=ED)
    assert r.status == 403


async def test_empty_full_upload_is_cpf04_and_ends_nothing(client):
    await upload(client, envelope(1, [record("A"), record("B")]))
    status, rep = await upload(client, envelope(2, [], mode="full"))
    assert status == 200 and rep["fileCode"] == "CPF04" and rep["ended"] == 0 and rep["received"] == 0
    full = {**LA1, "Upload-Sequence": "2", "Upload-Mode": "full"}
    r = await client.post("/v1/uploads", data=b"", headers={**full, "Content-Type": "application/x-ndjson"})
    assert r.status == 200 and (await r.json())["fileCode"] == "CPF04"
    r = await client.post(
        "/v1/uploads",
        data=b"localId,planType\n",
        headers={**full, "Content-Type": "text/csv", "Upload-Record-Count": "0"},
    )
    assert r.status == 200 and (await r.json())["fileCode"] == "CPF04"
    got = await ids(client)
    assert got["A"]["endDate"] is None and got["B"]["endDate"] is None
    status, rep = await upload(client, envelope(2, [record("A")]))  # CPF04 did not use the sequence up
    assert status == 200 and rep["fileCode"] == "CPF02"


def caseload(n, nhs="9990000018"):
    return [record(f"K{i}", nhs) for i in range(n)]


async def test_full_upload_ending_much_of_a_caseload_needs_the_count_confirmed(client):
    from tests.e2e.test_openapi_contract import conforms

    await upload(client, envelope(1, caseload(40)))
    kept = caseload(20)
    kept[0]["endDate"] = "2026-02-01"  # a change that must not be applied while the file is refused
    r = await client.post("/v1/uploads", json=envelope(2, kept, mode="full"), headers=LA1)
    body = await conforms(r, "/v1/uploads")
    assert r.status == 422 and body["code"] == "mass-end-refused" and body["wouldEnd"] == 20
    got = await ids(client)
    assert all(x["endDate"] is None for x in got.values()) and len(got) == 40  # nothing applied, nothing ended
    for wrong in ("19", "21", "twenty", ""):
        r = await client.post(
            "/v1/uploads", json=envelope(2, kept, mode="full"), headers={**LA1, "Upload-Confirm-End": wrong}
        )
        assert r.status == 422 and (await r.json())["wouldEnd"] == 20
    metrics = await (await client.get("/metrics")).text()
    assert "cpis_upload_mass_end_refused_total 5.0" in metrics
    # The same sequence, confirmed with the right number: applied (the refusals did not use the sequence up).
    r = await client.post(
        "/v1/uploads", json=envelope(2, kept, mode="full"), headers={**LA1, "Upload-Confirm-End": "20"}
    )
    rep = await r.json()
    assert r.status == 200 and rep["fileCode"] == "CPF02" and rep["ended"] == 20
    got = await ids(client)
    assert got["K0"]["endDate"] == "2026-02-01" and got["K39"]["endDate"] is not None


async def test_mass_end_limits(client):
    await upload(client, envelope(1, caseload(12)))
    # Ending 10 records never needs confirming, whatever the fraction.
    status, rep = await upload(client, envelope(2, caseload(2), mode="full"))
    assert status == 200 and rep["ended"] == 10
    # Already-ended records are not visible-and-open: re-sending the two is no mass end.
    status, rep = await upload(client, envelope(3, caseload(2), mode="full"))
    assert status == 200 and rep["ended"] == 0
    # A file that accepts nothing ends nothing, so it is never refused.
    await upload(client, envelope(4, [record(f"M{i}", "9990000026") for i in range(30)]))
    status, rep = await upload(client, envelope(5, [record("BAD", nhsNumber="1")], mode="full"))
    assert status == 200 and rep["fileCode"] == "CPF04" and rep["ended"] == 0
    # Under the fraction: 11 of 50 open records (more than 10, less than a quarter).
    await upload(client, envelope(6, [record(f"M{i}", "9990000026") for i in range(50)]))
    keep = [record(f"M{i}", "9990000026") for i in range(39)] + caseload(2)
    status, rep = await upload(client, envelope(7, keep, mode="full"))
    assert status == 200 and rep["ended"] == 11, rep
