"""The clinician view (/ed/) in a real browser: a CDS hook call's card, its SMART link launched by a mock EHR (a real
aiohttp server: SMART configuration, authorize that approves at once, token endpoint with appContext and patient)
through to the child's page, and the LA's notification; the dev sign-in and the posted NHS number by keyboard only;
launch failures; accessible (axe) in every state, at 200% zoom, meaning never by colour alone; the CSP's
frame-ancestors; no NHS number in URLs or the service log."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import api, assert_accessible, focused, put_record, smart_card_link, tab_to
from tests.support.ehr_double import Ehr, EhrThread, registry_with_smart
from tests.support.service import ServiceProcess
from tests.support.world import token

LA1_NAME = "Example Borough Council Children's Services"


@pytest.fixture(scope="module")
def ehr() -> Iterator[Ehr]:
    running = EhrThread(Ehr()).start()
    try:
        yield running.ehr
    finally:
        running.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, ehr: Ehr) -> Iterator[ServiceProcess]:
    """The service with the EHR double registered for SMART launch by RXX01 (its own, not the duty view's)."""
    tmp = tmp_path_factory.mktemp("ed-browser")
    registry = tmp / "registry.yaml"
    registry.write_text(registry_with_smart(ehr))
    proc = ServiceProcess(tmp, env={"CPIS_LOG_FORMAT": "json", "CPIS_REGISTRY": str(registry)})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def behaving(ehr: Ehr) -> Iterator[None]:
    ehr.mode = ""
    yield
    ehr.mode = ""


def la_notifications(service: ServiceProcess) -> list[dict[str, Any]]:
    status, body = api(service, "GET", "/v1/notifications?limit=1000", token("local-authority", "LA001"))
    assert status == 200
    return list(body["notifications"])


def test_card_smart_link_launches_the_clinician_view(
    service: ServiceProcess, ehr: Ehr, new_page: Callable[..., Page]
) -> None:
    nhs = "9990000018"
    put_record(service, "LA001", "ED-1", nhs)
    link = smart_card_link(service, nhs)
    before = len(la_notifications(service))
    page = new_page()
    urls: list[str] = []
    page.on("request", lambda req: urls.append(req.url))
    response = page.goto(ehr.launch_url(link["url"], ehr.new_launch(link["appContext"], patient="pat-7")))
    page.wait_for_url(re.compile(r"/ed/children/[A-Za-z0-9_-]+$"))
    assert response is not None
    expect(page.get_by_role("heading", level=1)).to_have_text("Child protection information")
    expect(page.locator(".cpis-phone").first).to_have_text("0300 000 0002")  # out of hours: emergency duty
    expect(page.get_by_text("Other number, office hours:")).to_contain_text("0300 000 0001")
    expect(page.get_by_text(LA1_NAME)).to_be_visible()
    expect(page.locator("#visits tbody tr")).to_have_count(2)  # the card's look-up and this opening
    expect(page.get_by_text("Signed in as Dr Sam Launch")).to_be_visible()
    expect(page.locator(".nhsuk-tag").first).to_have_text("Active")  # told in words, not only by colour
    assert_accessible(page, "child page after a SMART launch")
    assert not any(nhs in u for u in urls), "an NHS number in a URL"
    assert any(u.startswith(ehr.base + "/auth/authorize") for u in urls)
    after = la_notifications(service)
    assert len(after) == before + 1
    assert after[-1]["access"]["sourceEventId"].startswith("ed-view:")
    assert after[-1]["access"]["user"]["name"] == "Dr Sam Launch"
    headers = page.request.get(page.url).headers
    assert f"frame-ancestors {ehr.base}" in headers["content-security-policy"]
    assert "x-frame-options" not in headers
    log = service.output()
    assert "/ed/children/" in log and nhs not in log and "999 000 0018" not in log


@pytest.mark.parametrize("mode", ["wrong-state", "bad-code"])
def test_a_failed_launch_shows_an_accessible_error(
    service: ServiceProcess, ehr: Ehr, new_page: Callable[..., Page], mode: str
) -> None:
    nhs = "9990000026"
    put_record(service, "LA001", f"ED-F-{mode}", nhs)
    link = smart_card_link(service, nhs)
    ehr.mode = mode
    page = new_page()
    response = page.goto(ehr.launch_url(link["url"], ehr.new_launch(link["appContext"], patient="pat-7")))
    assert response is not None and response.status == 400
    expect(page.get_by_role("heading", level=1)).to_have_text("The CP-IS view could not be opened")
    assert response.headers["x-frame-options"] == "DENY"
    assert_accessible(page, f"launch failed ({mode})")


def test_keyboard_walk_sign_in_look_up_sign_out(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    nhs = "9990000034"
    put_record(service, "LA001", "ED-K-1", nhs, plan="LAC")
    page = new_page()
    page.goto(service.url + "/ed/")
    expect(page).to_have_url(re.compile(r"/ed/sign-in$"))
    assert_accessible(page, "sign-in")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the skip link, then from the main content on
    page.get_by_role("button", name="Sign in").focus()
    page.keyboard.press("Enter")
    expect(page.locator(".nhsuk-error-summary")).to_contain_text("Select your care setting")
    assert_accessible(page, "sign-in errors")
    tab_to(page, lambda p: p.evaluate("document.activeElement?.value") == "RXX01")
    page.keyboard.press("Space")
    tab_to(page, lambda p: p.evaluate("document.activeElement?.id") == "name")
    page.keyboard.type("Dr Kay Board")
    page.keyboard.press("Enter")
    page.wait_for_url("**/ed/")
    assert_accessible(page, "look-up form")
    tab_to(page, lambda p: p.evaluate("document.activeElement?.id") == "nhs")
    page.keyboard.type("999 000 003")
    page.keyboard.press("Enter")
    expect(page.locator(".nhsuk-error-summary")).to_contain_text("Enter a valid 10-digit NHS number")
    assert_accessible(page, "look-up form errors")
    tab_to(page, lambda p: p.evaluate("document.activeElement?.id") == "nhs")
    page.keyboard.press("Control+A")
    page.keyboard.type("999 000 0034")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/ed/children/[A-Za-z0-9_-]+$"))
    assert nhs not in page.url
    expect(page.get_by_role("heading", level=2).first).to_contain_text("Looked After Child")
    expect(page.locator(".cpis-phone").first).to_be_visible()
    assert_accessible(page, "child page after a look-up")
    tab_to(page, lambda p: focused(p, "Sign out"))
    page.keyboard.press("Enter")
    page.wait_for_url("**/ed/signed-out")
    assert_accessible(page, "signed out")


def test_usable_at_200_percent_zoom_and_nothing_found(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "ED-Z-1", "9990000042")
    # 200% zoom of a 1280 px wide window: the same CSS pixels as a 640 px one at twice the density
    page = new_page(viewport={"width": 640, "height": 400}, device_scale_factor=2)
    page.goto(service.url + "/ed/sign-in")
    page.get_by_label("Example Hospital Emergency Department").check()
    page.get_by_label("Your name").fill("Dr Zoe Example")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_label("NHS number").fill("9990000042")
    page.get_by_role("button", name="Look up").click()
    expect(page.locator(".cpis-phone").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert_accessible(page, "child page at 200% zoom")
    page.get_by_role("link", name="Look up another child").click()
    page.get_by_label("NHS number").fill("9990000050")  # no plan held
    page.get_by_role("button", name="Look up").click()
    expect(page.get_by_text("No child protection plan")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert_accessible(page, "nothing found at 200% zoom")


def test_security_headers_and_no_inline_script(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    page = new_page()
    response = page.goto(service.url + "/ed/sign-in")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert page.locator("script:not([src])").count() == 0
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "__Host-cpis-ed"]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax"


def test_works_without_javascript(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "ED-NOJS-1", "9990000069")
    page = new_page(java_script_enabled=False)
    page.goto(service.url + "/ed/sign-in")
    page.get_by_label("Example Urgent Treatment Centre").check()
    page.get_by_label("Your name").fill("Nurse Noel Script")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_label("NHS number").fill("999 000 0069")
    page.get_by_role("button", name="Look up").click()
    expect(page.locator(".cpis-phone").first).to_be_visible()
    expect(page.get_by_text("Signed in as Nurse Noel Script")).to_be_visible()
