"""The duty-team view (/la/) in a real browser: sign in, read and acknowledge a notification, look a child up,
sign out; accessible (axe) in every state, usable by keyboard, at 200% zoom and without JavaScript; isolated per
LA; CSRF-protected forms; no NHS number in URLs or logs."""

from __future__ import annotations

import re
from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.conftest import assert_accessible, ed_lookup, focused, put_record, sign_in, tab_to
from tests.support.service import ServiceProcess

LA1 = "Example Borough Council Children's Services"
LA2 = "Sample County Council Children's Social Care"
NHS = "9990000018"


def test_keyboard_walk_sign_in_read_acknowledge_sign_out(
    service: ServiceProcess, new_page: Callable[..., Page]
) -> None:
    put_record(service, "LA001", "WALK-1", NHS)
    ed_lookup(service, NHS, name="Dr Kay Board")
    page = new_page()
    page.goto(service.url + "/la/notifications")
    expect(page).to_have_url(re.compile(r"/la/sign-in$"))
    assert_accessible(page, "sign-in")

    tab_to(page, lambda p: p.evaluate("document.activeElement?.value") == "LA001")
    page.keyboard.press("Space")
    tab_to(page, lambda p: p.evaluate("document.activeElement?.id") == "name")
    page.keyboard.type("Sam Duty")
    page.keyboard.press("Enter")
    page.wait_for_url("**/la/notifications")
    row = page.locator("#notifications tbody tr").first
    expect(row).to_contain_text("999 000 0018")
    expect(row).to_contain_text("Example Hospital Emergency Department")
    expect(row).to_contain_text("New")
    assert_accessible(page, "notifications")

    tab_to(page, lambda p: focused(p, "open notification"))
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/la/notifications/[0-9a-f-]{36}$"))
    assert NHS not in page.url
    expect(page.locator("#visits tbody tr").first).to_contain_text("Dr Kay Board")
    expect(page.get_by_text("02 Apr 2016")).to_be_visible()
    assert_accessible(page, "notification, not acknowledged")

    tab_to(page, lambda p: focused(p, "Acknowledge"))
    page.keyboard.press("Enter")
    expect(page.locator("#acknowledged")).to_contain_text("Acknowledged by Sam Duty on")
    assert_accessible(page, "notification, acknowledged")

    page.goto(service.url + "/la/notifications?status=new")
    assert_accessible(page, "notifications filtered")
    expect(page.locator("#notifications-empty")).to_be_visible()
    page.goto(service.url + "/la/notifications?from=31-02-2026")
    expect(page.locator(".govuk-error-summary")).to_contain_text("Enter a real date")
    assert_accessible(page, "notifications, filter error")

    tab_to(page, lambda p: focused(p, "Sign out"))
    page.keyboard.press("Enter")
    page.wait_for_url("**/la/signed-out")
    assert_accessible(page, "signed out")
    page.goto(service.url + "/la/notifications")
    expect(page).to_have_url(re.compile(r"/la/sign-in$"))


def test_new_notifications_appear_without_a_reload(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA002", "LIVE-1", "9990000093")
    page = new_page()
    sign_in(page, service, LA2, name="Robin Live")
    page.wait_for_timeout(300)  # the page's event stream opens
    before = page.locator("#notifications tbody tr").count()
    ed_lookup(service, "9990000093", ods="RXX02", name="Nurse Ava Example")
    expect(page.locator("#notifications tbody tr")).to_have_count(before + 1, timeout=15000)
    row = page.locator("#notifications tbody tr").first
    expect(row).to_contain_text("999 000 0093")
    expect(row).to_contain_text("Example Urgent Treatment Centre")
    expect(page.locator("#live")).to_contain_text("New notification: a child seen at Example Urgent Treatment Centre")
    assert_accessible(page, "a notification arrived live")
    row.get_by_role("link").click()
    expect(page.locator("#visits tbody tr").first).to_contain_text("Nurse Ava Example")


def test_child_look_up_posts_the_number(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "LOOK-1", "9990000026", plan="LAC")
    ed_lookup(service, "9990000026", ods="RXX02", name="Nurse Ava Example")
    page = new_page()
    sign_in(page, service, LA1)
    page.get_by_role("link", name="Look up a child").click()
    assert_accessible(page, "look-up form")
    page.get_by_label("NHS number").fill("999 000 0026")
    page.get_by_role("button", name="Look up").click()
    expect(page.locator("#records")).to_contain_text("LOOK-1")
    expect(page.locator("#accesses")).to_contain_text("Example Urgent Treatment Centre")
    assert "9990000026" not in page.url and "0026" not in page.url
    assert_accessible(page, "look-up result")
    page.get_by_label("NHS number").fill("12345")
    page.get_by_role("button", name="Look up").click()
    expect(page.locator(".govuk-error-summary")).to_contain_text("Enter a 10-digit NHS number")
    assert_accessible(page, "look-up error")
    page.get_by_label("NHS number").fill("9990000034")
    page.get_by_role("button", name="Look up").click()
    expect(page.get_by_text("Your council holds no record for this NHS number.")).to_be_visible()


def test_another_councils_notification_is_not_found(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "ISO-1", "9990000042")
    ed_lookup(service, "9990000042")
    page = new_page()
    sign_in(page, service, LA1)
    page.locator("#notifications tbody tr a").first.click()
    mine = page.url
    other = new_page()
    sign_in(other, service, LA2, name="Alex Other")
    expect(other.locator("body")).not_to_contain_text("999 000 0042")
    response = other.goto(mine)
    assert response is not None and response.status == 404
    expect(other.get_by_role("heading", level=1)).to_have_text("Page not found")
    assert_accessible(other, "not found")
    ack = other.request.post(mine + "/acknowledge", form={"csrf_token": _csrf(other)})
    assert ack.status == 404
    page.reload()
    expect(page.locator("form[action$='/acknowledge']")).to_be_visible()  # still not acknowledged


def _csrf(page: Page) -> str:
    return str(page.locator("input[name=csrf_token]").first.get_attribute("value"))


def test_forms_need_the_sessions_csrf_token(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "CSRF-1", "9990000050")
    ed_lookup(service, "9990000050")
    page = new_page()
    sign_in(page, service, LA1)
    page.locator("#notifications tbody tr a").first.click()
    target = page.url + "/acknowledge"
    for form in ({}, {"csrf_token": "not-the-token"}):
        answer = page.request.post(target, form=form)
        assert answer.status == 400
    page.reload()
    expect(page.locator("form[action$='/acknowledge']")).to_be_visible()
    answer = page.request.post(service.url + "/la/sign-out", form={"csrf_token": "x"})
    assert answer.status == 400
    expect(page.locator("body")).to_contain_text("Signed in as")
    answer = page.request.post(target, form={"csrf_token": _csrf(page)})
    assert answer.ok
    page.reload()
    expect(page.locator("#acknowledged")).to_be_visible()


def test_usable_at_200_percent_zoom(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "ZOOM-1", "9990000069")
    ed_lookup(service, "9990000069")
    # 200% zoom of a 1280 px wide window: the same CSS pixels as a 640 px one at twice the density
    page = new_page(viewport={"width": 640, "height": 400}, device_scale_factor=2)
    sign_in(page, service, LA1)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert_accessible(page, "notifications at 200% zoom")
    page.locator("#notifications tbody tr a").first.click()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.get_by_role("button", name="Acknowledge").click()
    expect(page.locator("#acknowledged")).to_be_visible()
    assert_accessible(page, "notification at 200% zoom")


def test_works_without_javascript(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "NOJS-1", "9990000085")
    ed_lookup(service, "9990000085")
    page = new_page(java_script_enabled=False)
    sign_in(page, service, LA1)
    page.locator("#notifications tbody tr a").first.click()
    page.get_by_role("button", name="Acknowledge").click()
    expect(page.locator("#acknowledged")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/la/signed-out")


def test_security_headers_cookie_and_no_inline_script(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    page = new_page()
    response = page.goto(service.url + "/la/sign-in")
    assert response is not None
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert page.locator("script:not([src])").count() == 0
    (cookie,) = [c for c in page.context.cookies() if c["name"].startswith("__Host-")]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/"
    assert "domain" not in cookie or cookie["domain"] in ("127.0.0.1", "localhost")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".govuk-error-summary")).to_contain_text("Select your council")
    assert_accessible(page, "sign-in errors")
    forwarded = page.request.get(service.url + "/la/sign-in", headers={"X-Forwarded-Proto": "https"})
    assert "max-age=" in forwarded.headers["strict-transport-security"]
    assert "strict-transport-security" not in headers


def test_no_nhs_number_in_the_service_log(service: ServiceProcess, new_page: Callable[..., Page]) -> None:
    put_record(service, "LA001", "LOG-1", "9990000077")
    ed_lookup(service, "9990000077")
    page = new_page()
    sign_in(page, service, LA1)
    page.locator("#notifications tbody tr a").first.click()
    page.get_by_role("link", name="Look up a child").click()
    page.get_by_label("NHS number").fill("9990000077")
    page.get_by_role("button", name="Look up").click()
    expect(page.locator("#records")).to_be_visible()
    log = service.output()
    assert "/la/notifications" in log or "/la/children" in log
    assert "9990000077" not in log and "999 000 0077" not in log
