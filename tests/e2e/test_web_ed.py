"""The clinician view (/ed/) in process, against a real EHR double (tests/ehr_double.py): the CDS card's SMART link,
the EHR launch (state, registered iss, PKCE S256, the token's appContext and patient) and each way it is refused
(rate limited and audited), the dev sign-in and the posted NHS number, the access and the LA's notification, the
frame-ancestors of each page. The browser test (tests/browser/test_ed_view.py) walks the same pages as people do."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis

from cpis_bridge.web.state import SERVICES
from tests.support.ehr_double import Ehr, registry_with_smart
from tests.support.world import ED, LA1, auth, record

COOKIE = "__Host-cpis-ed"
NHS = "9990000018"
PV = "/cds-services/cpis-patient-view"
UTC = auth("care-setting", "RXX02", name="Nurse Ava Example")


class Browser:
    """Just enough of a browser: keeps the view's session cookie, follows nothing by itself."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.cookie: str | None = None
        self.urls: list[str] = []

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        headers = kw.pop("headers", {})
        if self.cookie:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        self.urls.append(path)
        r = await self.client.request(method, path, headers=headers, allow_redirects=False, **kw)
        if COOKIE in r.cookies:
            self.cookie = r.cookies[COOKIE].value or None
        if "Location" in r.headers:
            self.urls.append(r.headers["Location"])
        return r

    async def csrf(self, path: str) -> str:
        html = await (await self.request("GET", path)).text()
        m = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert m, html[:500]
        return m.group(1)


@pytest.fixture
async def ed(aiohttp_client: Any, aiohttp_server: Any, make_settings: Any, tmp_path: Path) -> Any:
    from cpis_bridge.app import create_app

    ehr = Ehr()
    server = await aiohttp_server(ehr.app())
    ehr.base = str(server.make_url("")).rstrip("/")
    registry = tmp_path / "registry.yaml"
    registry.write_text(registry_with_smart(ehr))
    settings = make_settings(registry=registry, web_signin_failures=3)
    client = await aiohttp_client(create_app(settings))
    r = aredis.Redis.from_url(settings.redis_url, decode_responses=True)
    async with aiohttp.ClientSession() as outside:  # the browser's requests to the EHR
        yield client, ehr, outside, r, settings.key_prefix
    await r.aclose()


async def card_link(client: Any, headers: dict[str, str] = ED, nhs: str = NHS) -> dict[str, Any] | None:
    r = await client.put(f"/v1/records/CASE-{nhs}", json=record(f"CASE-{nhs}", nhs=nhs), headers=LA1)
    assert r.status in (200, 201), await r.text()
    hook = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "PractitionerRole/pr-1", "patientId": "pat-1"},
        "prefetch": {
            "patient": {
                "resourceType": "Patient",
                "id": "pat-1",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
            },
            "user": {
                "resourceType": "PractitionerRole",
                "id": "pr-1",
                "practitioner": {"display": "Dr Sam Launch"},
                "code": [{"coding": [{"code": "R8000"}]}],
            },
        },
    }
    r = await client.post(PV, json=hook, headers=headers)
    assert r.status == 200
    cards = (await r.json())["cards"]
    assert cards
    links = cards[0].get("links")
    return links[0] if links else None


async def launch(b: Browser, ehr: Ehr, outside: aiohttp.ClientSession, link: dict[str, Any]) -> Any:
    """The EHR launches the link; the browser goes to the EHR's authorize endpoint and back: our last answer."""
    launch_id = ehr.new_launch(link["appContext"], patient="pat-1")
    assert urlsplit(link["url"]).path == "/ed/launch"
    r = await b.request("GET", "/ed/launch?" + urlsplit(ehr.launch_url(link["url"], launch_id)).query)
    if r.status != 303 or not r.headers["Location"].startswith(ehr.base):
        return r
    async with outside.get(r.headers["Location"], allow_redirects=False) as back:
        assert back.status == 302, await back.text()
        location = back.headers["Location"]
    b.urls.append(location)
    parts = urlsplit(location)
    return await b.request("GET", f"{parts.path}?{parts.query}")


async def audit(r: aredis.Redis, prefix: str) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in await r.lrange(f"{prefix}:audit:sys", 0, -1)]


async def notifications(client: Any) -> list[dict[str, Any]]:
    r = await client.get("/v1/notifications", headers=LA1)
    assert r.status == 200
    return list((await r.json())["notifications"])


async def test_card_link_launch_opens_the_page_as_an_access(ed: Any) -> None:
    client, ehr, outside, r, prefix = ed
    link = await card_link(client)
    assert link is not None and link["type"] == "smart" and link["url"].endswith("/ed/launch")
    assert NHS not in orjson.dumps(link).decode() and len(link["appContext"]) >= 32
    before = len(await notifications(client))
    b = Browser(client)
    done = await launch(b, ehr, outside, link)
    assert done.status == 303 and re.fullmatch(r"/ed/children/[A-Za-z0-9_-]{20,}", done.headers["Location"])
    authorize = next(q for path, q in ehr.seen if path == "/auth/authorize")
    assert authorize["code_challenge_method"] == "S256" and authorize["aud"] == ehr.iss
    assert authorize["client_id"] == "cpis-clinician-view" and "launch" in authorize["scope"].split()
    page = await b.request("GET", done.headers["Location"])
    html = await page.text()
    assert page.status == 200
    assert "Child Protection Plan" in html and "Example Borough Council Children&#39;s Services" in html
    assert "Ring now" in html and "0300 000 0001" in html and "0300 000 0002" in html
    assert "Example Hospital Emergency Department" in html  # the recent visits: the card's look-up and this one
    csp = page.headers["Content-Security-Policy"]
    assert (
        f"frame-ancestors {ehr.base}" in csp and "script-src 'self';" in csp and "X-Frame-Options" not in page.headers
    )
    assert all(NHS not in u for u in b.urls)
    after = await notifications(client)
    assert len(after) == before + 1  # the view's opening notified the LA, as a FHIR look-up does
    assert after[-1]["access"]["sourceEventId"].startswith("ed-view:")
    assert after[-1]["access"]["user"]["name"] == "Dr Sam Launch"
    actions = [e["action"] for e in await audit(r, prefix)]
    assert "web.signin" in actions
    metrics = await (await client.get("/metrics")).text()
    assert 'cpis_web_signins_total{method="smart",outcome="signed-in",reason="-"} 1.0' in metrics
    # the appContext is used once: the same link launched again is refused
    again = await launch(Browser(client), ehr, outside, link)
    assert again.status == 400 and "could not be opened" in await again.text()
    # the EHR's SMART configuration was read once for both launches
    assert [path for path, _ in ehr.seen].count("/fhir/.well-known/smart-configuration") == 1


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("wrong-state", "state-mismatch"),
        ("bad-code", "token-refused"),
        ("deny", "authorization-refused"),
        ("other-context", "unknown-app-context"),
        ("other-patient", "patient-mismatch"),
        ("no-s256", "pkce-unsupported"),
    ],
)
async def test_launch_failures_are_refused_and_audited(ed: Any, mode: str, reason: str) -> None:
    client, ehr, outside, r, prefix = ed
    link = await card_link(client)
    assert link is not None
    ehr.mode = mode
    b = Browser(client)
    out = await launch(b, ehr, outside, link)
    assert out.status == 400 and "could not be opened" in await out.text()
    assert out.headers["X-Frame-Options"] == "DENY"
    failed = [e for e in await audit(r, prefix) if e["action"] == "web.ed.launch.failed"]
    assert [e["detail"]["reason"] for e in failed] == [reason]
    assert NHS not in orjson.dumps(failed).decode()
    metrics = await (await client.get("/metrics")).text()
    assert f'cpis_web_signins_total{{method="smart",outcome="failed",reason="{reason}"}} 1.0' in metrics
    assert (await b.request("GET", "/ed/")).headers["Location"] == "/ed/sign-in"  # not signed in


async def test_launch_needs_a_registered_iss_and_its_own_care_setting(ed: Any) -> None:
    client, ehr, outside, r, prefix = ed
    b = Browser(client)
    out = await b.request("GET", "/ed/launch?iss=https://ehr.elsewhere.example/fhir&launch=abc")
    assert out.status == 400
    assert not any(path.startswith("/fhir") for path, _ in ehr.seen)
    out = await b.request("GET", f"/ed/launch?iss={ehr.iss}")  # no launch
    assert out.status == 400
    # a context minted for another care setting (RXX02 registers no SMART launch) cannot be launched from this iss
    other = await client.app[SERVICES].launches.mint(
        {"nhs": NHS, "cs": "RXX02", "patient": "pat-1", "user": {"id": "x"}}
    )
    out = await launch(b, ehr, outside, {"url": "http://127.0.0.1:8080/ed/launch", "appContext": other})
    assert out.status == 400
    reasons = [e["detail"]["reason"] for e in await audit(r, prefix) if e["action"] == "web.ed.launch.failed"]
    assert sorted(reasons) == ["care-setting-mismatch", "issuer-not-registered", "missing-parameters"]


async def test_a_care_setting_without_smart_launch_gets_no_link(ed: Any) -> None:
    client, *_ = ed
    assert await card_link(client, headers=UTC) is None


async def test_failures_are_rate_limited(ed: Any) -> None:
    client, ehr, outside, r, prefix = ed
    b = Browser(client)
    for _ in range(3):
        assert (await b.request("GET", "/ed/launch?iss=https://nowhere.example/fhir&launch=a")).status == 400
    link = await card_link(client)
    assert link is not None
    refused = await launch(b, ehr, outside, link)  # even a good launch waits now
    assert refused.status == 429 and "Too many attempts" in await refused.text()
    actions = [e["action"] for e in await audit(r, prefix)]
    assert actions.count("web.ed.launch.failed") == 3 and actions.count("web.ed.signin.refused") == 1


async def test_dev_sign_in_and_posted_nhs_number(ed: Any) -> None:
    client, _, _, r, prefix = ed
    await card_link(client)  # a record for the child
    b = Browser(client)
    assert (await b.request("GET", "/ed/sign-in")).headers["Content-Security-Policy"].endswith("frame-ancestors 'none'")
    token = await b.csrf("/ed/sign-in")
    bad = await b.request("POST", "/ed/sign-in", data={"csrf_token": token, "ods": "LA001", "name": "Kim"})
    assert bad.status == 400 and "Select your care setting" in await bad.text()
    token = await b.csrf("/ed/sign-in")
    ok = await b.request("POST", "/ed/sign-in", data={"csrf_token": token, "ods": "RXX01", "name": "Dr Kim Example"})
    assert ok.status == 303 and ok.headers["Location"] == "/ed/"
    token = await b.csrf("/ed/")
    invalid = await b.request("POST", "/ed/children", data={"csrf_token": token, "nhs": "123"})
    assert invalid.status == 400 and "Enter a valid 10-digit NHS number" in await invalid.text()
    before = len(await notifications(client))
    found = await b.request("POST", "/ed/children", data={"csrf_token": token, "nhs": "999 000 0018"})
    assert found.status == 303 and NHS not in found.headers["Location"]
    page = await b.request("GET", found.headers["Location"])
    html = await page.text()
    assert "999 000 0018" in html and "Ring now" in html
    after = await notifications(client)
    assert len(after) == before + 1 and after[-1]["access"]["user"]["name"] == "Dr Kim Example"
    # a reload is a read (audited), not another access
    assert (await b.request("GET", found.headers["Location"])).status == 200
    assert len(await notifications(client)) == before + 1
    # another session's page id is nobody's page here
    assert (await Browser(client).request("GET", found.headers["Location"])).status == 303
    failed = [e for e in await audit(r, prefix) if e["action"] == "web.ed.signin.failed"]
    assert len(failed) == 1 and "Kim" not in orjson.dumps(failed).decode()
    nobody = await b.request("POST", "/ed/children", data={"csrf_token": token, "nhs": "9990000026"})
    empty = await b.request("GET", nobody.headers["Location"])
    assert "No child protection plan" in await empty.text()


async def test_production_has_no_local_sign_in(aiohttp_client: Any, make_settings: Any) -> None:
    from cpis_bridge.app import create_app

    settings = make_settings(
        auth_jwks_url="http://127.0.0.1:9/jwks.json", auth_issuer="https://idp.example", auth_audience="cpis"
    )
    b = Browser(await aiohttp_client(create_app(settings)))
    page = await b.request("GET", "/ed/sign-in")
    html = await page.text()
    assert page.status == 200 and "<form" not in html.replace('action="/ed/sign-out"', "")
    assert "Open this view from the CP-IS card" in html
    form = {"csrf_token": "x", "ods": "RXX01", "name": "Dr Kim Example"}
    assert (await b.request("POST", "/ed/sign-in", data=form)).status == 404
