"""Sign-in to the duty-team view with the council's own OpenID Connect provider, in a real browser: a real provider
(`oidc-provider-mock`, run as its own server) and `cpis-bridge serve` configured, through its registry, to use it.
Sign in (authorization code + PKCE), a notification arriving live after an ED look-up through the FHIR API, reading
and acknowledging it, signing out (the provider's session too); another council's notification is not found; forms
refuse a missing or wrong CSRF token; an account that maps to no council is refused; the idle timeout."""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import assert_accessible, ed_lookup, put_record
from tests.support.oidc import LA1_SECRET, Provider, registry_with_sign_in
from tests.support.service import ServiceProcess


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    p = Provider(tmp_path_factory.mktemp("oidc") / "provider.log")
    try:
        yield p
    finally:
        p.stop()


def _service(tmp: Path, provider: Provider, **env: str) -> ServiceProcess:
    return ServiceProcess(
        tmp,
        env={
            "CPIS_REGISTRY": str(registry_with_sign_in(tmp, provider.url)),
            "LA001_OIDC_SECRET": LA1_SECRET,
            "CPIS_LOG_FORMAT": "json",
            **env,
        },
    ).start()


@pytest.fixture(scope="module")
def oidc_service(tmp_path_factory: pytest.TempPathFactory, provider: Provider) -> Iterator[ServiceProcess]:
    proc = _service(tmp_path_factory.mktemp("oidc-service"), provider, CPIS_WEB_SIGNIN_FAILURES="50")
    try:
        yield proc
    finally:
        proc.stop()


def sign_in(page: Page, service: ServiceProcess, provider: Provider, ods: str, sub: str) -> None:
    """Choose the council, go to its provider, sign in there as ``sub`` and come back."""
    page.goto(service.url + "/la/sign-in")
    page.locator(f"input[name=council][value={ods}]").check()
    page.get_by_role("button", name="Continue to your council sign-in").click()
    page.wait_for_url(provider.url + "/oauth2/authorize?**")
    page.get_by_placeholder("sub").fill(sub)
    page.get_by_role("button", name="Authorize").click()


def _csrf(page: Page) -> str:
    return str(page.locator("input[name=csrf_token]").first.get_attribute("value"))


def test_sign_in_watch_a_notification_arrive_read_acknowledge_sign_out(
    oidc_service: ServiceProcess, provider: Provider, new_page: Callable[..., Page]
) -> None:
    nhs = "9990000018"
    sam = provider.person("sam.duty@la001.example", name="Sam Duty", groups=["staff", "cpis-duty-la001"])
    put_record(oidc_service, "LA001", "OIDC-1", nhs)
    page = new_page()
    page.goto(oidc_service.url + "/la/notifications")
    expect(page).to_have_url(re.compile(r"/la/sign-in$"))
    assert_accessible(page, "sign-in with council accounts")
    page.locator("input[name=council][value=LA001]").check()
    page.get_by_role("button", name="Continue to your council sign-in").click()
    page.wait_for_url(provider.url + "/oauth2/authorize?**")
    asked = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
    assert asked["client_id"] == ["cpis-la001"] and asked["response_type"] == ["code"]
    assert asked["code_challenge_method"] == ["S256"] and len(asked["code_challenge"][0]) == 43  # PKCE
    assert asked["nonce"][0] and asked["state"][0] and "openid" in asked["scope"][0].split()
    assert asked["redirect_uri"] == [oidc_service.url + "/la/sign-in/callback"]
    page.get_by_placeholder("sub").fill(sam)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url("**/la/notifications")
    expect(page.locator(".cpis-signed-in")).to_contain_text("Signed in as Sam Duty (LA001)")

    expect(page.locator("table[data-live-ready]")).to_have_count(1, timeout=15000)  # the live stream is open
    ed_lookup(oidc_service, nhs, name="Dr Kay Board")
    row = page.locator("#notifications tbody tr").first
    expect(row).to_contain_text("999 000 0018", timeout=15000)
    expect(page.locator("#live")).to_contain_text("New notification: a child seen at Example Hospital")
    row.get_by_role("link").click()
    page.wait_for_url(re.compile(r"/la/notifications/[0-9a-f-]{36}$"))
    expect(page.locator("#visits tbody tr").first).to_contain_text("Dr Kay Board")
    page.get_by_role("button", name="Acknowledge").click()
    expect(page.locator("#acknowledged")).to_contain_text("Acknowledged by Sam Duty on")

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(provider.url + "/oauth2/end_session?**")  # the provider's session ends too
    ended = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
    assert ended["post_logout_redirect_uri"] == [oidc_service.url + "/la/signed-out"] and ended["id_token_hint"]
    page.get_by_role("button", name="End session").click()
    page.wait_for_url(re.compile(r"/la/signed-out"))
    page.goto(oidc_service.url + "/la/notifications")
    expect(page).to_have_url(re.compile(r"/la/sign-in$"))
    audit = oidc_service.output()
    assert nhs not in audit and "Sam Duty" not in audit


def test_another_councils_notification_is_not_found_and_forms_need_the_token(
    oidc_service: ServiceProcess, provider: Provider, new_page: Callable[..., Page]
) -> None:
    nhs = "9990000042"
    sam = provider.person("sam.iso@la001.example", name="Sam Iso", groups="cpis-duty-la001")
    alex = provider.person("alex@la002.example", name="Alex Other", groups=["cpis-duty-la002"])
    put_record(oidc_service, "LA001", "OIDC-ISO", nhs)
    ed_lookup(oidc_service, nhs)
    page = new_page()
    sign_in(page, oidc_service, provider, "LA001", sam)
    page.wait_for_url("**/la/notifications")
    page.locator("#notifications tbody tr a").first.click()
    mine = page.url

    other = new_page()
    sign_in(other, oidc_service, provider, "LA002", alex)
    other.wait_for_url("**/la/notifications")
    expect(other.locator(".cpis-signed-in")).to_contain_text("Alex Other (LA002)")
    expect(other.locator("body")).not_to_contain_text("999 000 0042")
    response = other.goto(mine)
    assert response is not None and response.status == 404
    expect(other.get_by_role("heading", level=1)).to_have_text("Page not found")
    assert other.request.post(mine + "/acknowledge", form={"csrf_token": _csrf(other)}).status == 404

    forms: list[dict[str, str | float | bool]] = [{}, {"csrf_token": "not-the-token"}]
    for form in forms:
        assert page.request.post(mine + "/acknowledge", form=form).status == 400
        assert page.request.post(oidc_service.url + "/la/sign-out", form=form).status == 400
    page.reload()
    expect(page.locator("form[action$='/acknowledge']")).to_be_visible()  # neither took effect
    expect(page.locator(".cpis-signed-in")).to_contain_text("Sam Iso")
    start = page.request.post(oidc_service.url + "/la/sign-in/oidc", form={"council": "LA001"}, max_redirects=0)
    assert start.status == 400  # starting a sign-in is a form too
    assert page.request.post(mine + "/acknowledge", form={"csrf_token": _csrf(page)}).ok


def test_an_account_of_no_council_is_refused(
    oidc_service: ServiceProcess, provider: Provider, new_page: Callable[..., Page]
) -> None:
    # signed in at LA001's provider, but carrying only the other council's group, or none
    for sub, groups in (("pat@la001.example", ["staff"]), ("kim@la002.example", ["cpis-duty-la002"])):
        provider.person(sub, name="Pat Nobody", groups=groups)
        page = new_page()
        sign_in(page, oidc_service, provider, "LA001", sub)
        page.wait_for_url(re.compile(r"/la/sign-in/callback"))
        expect(page.get_by_role("heading", level=1)).to_have_text("Your account cannot use this service")
        assert_accessible(page, "refused")
        page.goto(oidc_service.url + "/la/notifications")
        expect(page).to_have_url(re.compile(r"/la/sign-in$"))
    # a callback that no attempt of this browser started (a forged or replayed answer) signs nobody in
    page = new_page()
    page.goto(oidc_service.url + "/la/sign-in")
    answer = page.goto(oidc_service.url + "/la/sign-in/callback?code=x&state=y")
    assert answer is not None and answer.status == 400
    metrics = urllib.request.urlopen(oidc_service.url + "/metrics", timeout=5).read().decode()
    assert re.search(r'cpis_web_signins_total\{method="oidc",outcome="failed",reason="no-la"\} 2\.0', metrics)
    assert re.search(r'cpis_web_signins_total\{method="oidc",outcome="signed-in",reason="-"\} [1-9]', metrics)


def test_idle_timeout_ends_the_session(tmp_path: Path, provider: Provider, new_page: Callable[..., Page]) -> None:
    service = _service(tmp_path, provider, CPIS_WEB_SESSION_IDLE_S="3")
    try:
        sub = provider.person("sam.idle@la001.example", name="Sam Idle", groups=["cpis-duty-la001"])
        page = new_page()
        sign_in(page, service, provider, "LA001", sub)
        page.wait_for_url("**/la/notifications")
        page.wait_for_timeout(2000)
        page.reload()  # a request starts the idle time again
        expect(page).to_have_url(re.compile(r"/la/notifications$"))
        page.wait_for_timeout(4500)  # no request for longer than the idle timeout
        page.goto(service.url + "/la/children")
        expect(page).to_have_url(re.compile(r"/la/sign-in$"))
    finally:
        service.stop()
