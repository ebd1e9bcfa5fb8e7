"""The duty-team web view in process: sessions in Redis (idle timeout renewed by each request, a new id at
sign-in, sign-out ends it), sign-in failures rate limited and audited, the notification list's filters and
paging. The browser tests (tests/browser) cover the pages as people use them."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis

from cpis_bridge.config import Settings
from tests.support.polling import wait_for
from tests.support.world import ED, LA1, LA2, auth, record

COOKIE = "__Host-cpis-la"
UTC_ED = auth("care-setting", "RXX02", name="Nurse Ava Example")


class Browser:
    """Just enough of a browser: keeps the session cookie (aiohttp's jar keeps Secure cookies for https only)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.cookie: str | None = None

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        headers = kw.pop("headers", {})
        if self.cookie:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        r = await self.client.request(method, path, headers=headers, allow_redirects=False, **kw)
        if COOKIE in r.cookies:
            self.cookie = r.cookies[COOKIE].value or None
        return r

    async def csrf(self, path: str = "/la/sign-in") -> str:
        html = await (await self.request("GET", path)).text()
        m = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert m, html[:500]
        return m.group(1)

    async def sign_in(self, ods: str = "LA001", name: str = "Sam Duty") -> Any:
        token = await self.csrf()
        return await self.request("POST", "/la/sign-in", data={"csrf_token": token, "ods": ods, "name": name})


@pytest.fixture
async def web(aiohttp_client: Any, make_settings: Any) -> Any:
    from cpis_bridge.app import create_app

    settings: Settings = make_settings(web_session_idle_s=30, web_signin_failures=3)
    client = await aiohttp_client(create_app(settings))
    r = aredis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client, r, settings.key_prefix
    await r.aclose()


async def test_session_lives_in_redis_renewed_by_each_request_and_ends_on_sign_out(web: Any) -> None:
    client, r, prefix = web
    b = Browser(client)
    await b.csrf()
    before = b.cookie
    answer = await b.sign_in()
    assert answer.status == 303 and answer.headers["Location"] == "/la/notifications"
    assert b.cookie and b.cookie != before  # a new session id at sign-in
    assert await r.exists(f"{prefix}:web:s:{before}") == 0
    key = f"{prefix}:web:s:{b.cookie}"
    assert 0 < await r.ttl(key) <= 30
    assert "Sam Duty" in (await r.get(key))
    await r.expire(key, 5)
    assert (await b.request("GET", "/la/notifications")).status == 200
    assert await r.ttl(key) > 5  # the request started the idle timeout again
    await r.delete(key)  # what the idle timeout does when it runs out
    gone = await b.request("GET", "/la/notifications")
    assert gone.status == 303 and gone.headers["Location"] == "/la/sign-in"

    await b.sign_in()
    key = f"{prefix}:web:s:{b.cookie}"
    token = await b.csrf("/la/notifications")
    out = await b.request("POST", "/la/sign-out", data={"csrf_token": token})
    assert out.status == 303 and await r.exists(key) == 0 and b.cookie is None


async def test_sign_in_failures_are_rate_limited_and_audited(web: Any) -> None:
    client, r, prefix = web
    b = Browser(client)
    for form in ({"ods": "LA999", "name": "Sam"}, {"ods": "LA001", "name": " "}, {"ods": "", "name": ""}):
        token = await b.csrf()
        assert (await b.request("POST", "/la/sign-in", data={"csrf_token": token, **form})).status == 400
    refused = await b.sign_in()  # even a good sign-in waits now
    assert refused.status == 429 and "Too many attempts" in await refused.text()
    audit = [orjson.loads(e) for e in await r.lrange(f"{prefix}:audit:sys", 0, -1)]
    actions = [e["action"] for e in audit]
    assert actions.count("web.signin.failed") == 3 and actions.count("web.signin.refused") == 1
    assert "web.signin" not in actions
    assert all("Sam" not in orjson.dumps(e).decode() for e in audit)


async def _notifications(client: Any, n: int, nhs: str = "9990000018", headers: dict[str, str] = ED) -> None:
    for _ in range(n):
        r = await client.get(
            "/fhir/CareTeam", params={"patient:identifier": f"https://fhir.nhs.uk/Id/nhs-number|{nhs}"}, headers=headers
        )
        assert r.status == 200


def _rows(html: str) -> list[str]:
    return re.findall(r'href="/la/notifications/([0-9a-f-]{36})"', html)


async def test_list_filters_and_pages(web: Any) -> None:
    client, _, _ = web
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    await _notifications(client, 27)
    await _notifications(client, 3, headers=UTC_ED)
    b = Browser(client)
    await b.sign_in()
    first = await (await b.request("GET", "/la/notifications")).text()
    ids = _rows(first)
    assert len(ids) == 25 and "Example Urgent Treatment Centre" in first.split("</tr>")[1]  # newest first
    older = re.search(r'href="/la/notifications\?(before=[^"]+)" rel="next"', first)
    assert older
    second = await (await b.request("GET", "/la/notifications?" + older.group(1).replace("&amp;", "&"))).text()
    assert len(_rows(second)) == 5 and not set(_rows(second)) & set(ids) and 'rel="next"' not in second

    only = await (await b.request("GET", "/la/notifications?setting=RXX02")).text()
    assert len(_rows(only)) == 3
    nid = ids[0]
    assert (await client.post(f"/v1/notifications/{nid}/ack", headers=LA1)).status == 204
    acked = await (await b.request("GET", "/la/notifications?status=acknowledged")).text()
    assert _rows(acked) == [nid]
    new = await (await b.request("GET", "/la/notifications?status=new")).text()
    assert nid not in _rows(new) and len(_rows(new)) == 25
    today = dt.datetime.now(dt.UTC).date()
    day = dt.timedelta(days=1)
    assert _rows(await (await b.request("GET", f"/la/notifications?from={today + day}")).text()) == []
    assert _rows(await (await b.request("GET", f"/la/notifications?to={today - day}")).text()) == []
    both = await (await b.request("GET", f"/la/notifications?from={today - day}&to={today + day}")).text()
    assert len(_rows(both)) == 25
    bad = await b.request("GET", "/la/notifications?from=31-02-2026")
    assert bad.status == 200 and "Enter a real date" in await bad.text()


async def test_a_selective_filter_pages_through_every_match_within_its_read_budget(web: Any, monkeypatch: Any) -> None:
    """The care-setting filter runs inside Redis and reads at most SCAN_BUDGET entries a page: with a budget smaller
    than the gaps between matches, pages may come short but following "next" still shows every match once."""
    from cpis_bridge.services import inbox

    client, _, _ = web
    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    await _notifications(client, 10, headers=UTC_ED)
    await _notifications(client, 20)
    await _notifications(client, 18, headers=UTC_ED)
    b = Browser(client)
    await b.sign_in()

    async def walk(path: str) -> list[list[str]]:
        pages = []
        while True:
            html = await (await b.request("GET", path)).text()
            pages.append(_rows(html))
            after = re.search(r'href="/la/notifications\?([^"]+)" rel="next"', html)
            if not after:
                return pages
            path = "/la/notifications?" + after.group(1).replace("&amp;", "&")

    pages = await walk("/la/notifications?setting=RXX02")
    assert [len(p) for p in pages] == [25, 3]
    everything = [i for p in pages for i in p]
    monkeypatch.setattr(inbox, "SCAN_BUDGET", 15)
    budgeted = await walk("/la/notifications?setting=RXX02")
    assert [i for p in budgeted for i in p] == everything and len(budgeted) > 2  # same rows, same order
    others = [i for p in await walk("/la/notifications?setting=RXX01") for i in p]
    assert len(others) == 20 and not set(others) & set(everything)


async def test_500_live_streams_on_one_process_each_get_the_new_notification(web: Any) -> None:
    client, _, _ = web
    from cpis_bridge.web.views.duty import FEED

    assert (await client.put("/v1/records/CASE-1", json=record(), headers=LA1)).status == 201
    assert (await client.put("/v1/records/CASE-2", json=record("CASE-2", "9990000026"), headers=LA2)).status == 201
    b, other = Browser(client), Browser(client)
    await b.sign_in()
    await other.sign_in("LA002", "Alex Other")
    feed = next(sub[FEED] for sub in _subapps(client.app) if FEED in sub)
    assert not feed.started.is_set()  # nobody watches yet: the process does not read the inboxes
    n = 500
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        streams = [
            await http.get(client.make_url("/la/events"), headers={"Cookie": f"{COOKIE}={b.cookie}"}) for _ in range(n)
        ]
        theirs = await http.get(client.make_url("/la/events"), headers={"Cookie": f"{COOKIE}={other.cookie}"})
        streams_all = [*streams, theirs]
        await asyncio.wait_for(feed.started.wait(), 10)
        try:
            assert all(s.status == 200 and s.content_type == "text/event-stream" for s in streams)
            assert len(feed.watchers["LA001"]) == n
            await _notifications(client, 1)

            async def first_event(s: aiohttp.ClientResponse) -> dict[str, Any]:
                event = None
                async for line in s.content:
                    text = line.decode().strip()
                    if text.startswith("event:"):
                        event = text.split(":", 1)[1].strip()
                    elif text.startswith("data:") and event == "notification":
                        return dict(orjson.loads(text.split(":", 1)[1]))
                raise AssertionError("stream ended")

            got = await asyncio.wait_for(asyncio.gather(*(first_event(s) for s in streams)), 30)
            assert {g["nhs"] for g in got} == {"999 000 0018"} and len(got) == n
            assert got[0]["href"].startswith("/la/notifications/") and "9990000018" not in got[0]["href"]
            await _notifications(client, 1, nhs="9990000026")
            # the other council's stream skipped LA001's notification: its first event is its own
            assert (await asyncio.wait_for(first_event(theirs), 10))["nhs"] == "999 000 0026"
        finally:
            for s in streams_all:
                s.close()
    await wait_for(lambda: not feed.watchers["LA001"], 5, 0.1, "closed streams stop watching")
    # and with nobody watching, the tail stops reading (it notices at the end of its current blocking read: 5 s)
    await wait_for(lambda: not feed.started.is_set(), 15, 0.1, "the tail stops reading")


def _subapps(app: Any) -> list[Any]:
    return [r._app for r in app.router.resources() if hasattr(r, "_app")]


async def test_sign_in_failures_are_limited_per_council_too(aiohttp_client: Any, make_settings: Any) -> None:
    """Past CPIS_WEB_SIGNIN_LA_FAILURES failures for one council (from any address), that council's sign-ins
    wait; other councils' do not. Each failure and refusal is audited and counted in the metric."""
    from cpis_bridge.app import create_app

    settings: Settings = make_settings(web_signin_failures=100, web_signin_la_failures=2)
    client = await aiohttp_client(create_app(settings))
    r = aredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        b = Browser(client)
        for _ in range(2):
            assert (await b.sign_in("LA001", name=" ")).status == 400
        assert (await b.sign_in("LA001")).status == 429
        assert (await b.sign_in("LA002", "Alex Other")).status == 303
        audit = [orjson.loads(e) for e in await r.lrange(f"{settings.key_prefix}:audit:sys", 0, -1)]
        failed = [e for e in audit if e["action"] == "web.signin.failed"]
        assert len(failed) == 2 and all(e["org"] == "LA001" and e["detail"]["reason"] == "form" for e in failed)
        assert [e["org"] for e in audit if e["action"] == "web.signin.refused"] == ["LA001"]
        metrics = await (await client.get("/metrics")).text()
        assert 'cpis_web_signins_total{method="dev",outcome="failed",reason="form"} 2.0' in metrics
        assert 'cpis_web_signins_total{method="dev",outcome="refused",reason="rate-limited"} 1.0' in metrics
    finally:
        await r.aclose()


async def test_a_council_sign_in_without_its_client_secret_stops_the_start(
    aiohttp_client: Any, make_settings: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    import yaml

    from cpis_bridge.app import create_app
    from tests.support.world import REGISTRY

    doc = yaml.safe_load(REGISTRY.read_text())
    doc["localAuthorities"][0]["signIn"] = {
        "issuer": "https://login.la001.example",
        "clientId": "cpis",
        "clientSecretEnv": "CPIS_TEST_ABSENT_SECRET",
        "claim": "groups",
        "value": "duty",
    }
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.delenv("CPIS_TEST_ABSENT_SECRET", raising=False)
    with pytest.raises(RuntimeError, match="LA001: the sign-in client secret"):
        await aiohttp_client(create_app(make_settings(registry=path)))
    monkeypatch.setenv("CPIS_TEST_ABSENT_SECRET", "s3cret")
    client = await aiohttp_client(create_app(make_settings(registry=path)))
    page = await (await client.get("/la/sign-in")).text()
    assert 'action="/la/sign-in/oidc"' in page and 'value="LA001"' in page
    csp = (await client.get("/la/sign-in")).headers["Content-Security-Policy"]
    assert "form-action 'self' https://login.la001.example;" in csp  # the provider is reached by a redirect
