"""Screenshots of the web views for the README (docs/screenshots/): `python -m tests.browser.screenshots`.
Runs the service as a subprocess with invented data, as the browser tests do, its councils signing in at a real
OpenID Connect provider (oidc-provider-mock) run beside it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.browser.conftest import CHROMIUM, ed_lookup, put_record, smart_card_link
from tests.support.ehr_double import Ehr, EhrThread, registry_with_smart
from tests.support.oidc import LA1_SECRET, Provider, registry_with_sign_in
from tests.support.service import ServiceProcess

OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        provider = Provider(Path(tmp) / "provider.log")
        registry = registry_with_sign_in(Path(tmp), provider.url)
        env = {"CPIS_REGISTRY": str(registry), "LA001_OIDC_SECRET": LA1_SECRET}
        service = ServiceProcess(Path(tmp) / "service", env=env).start()
        try:
            sam = provider.person("sam.duty@la001.example", name="Sam Duty", groups=["cpis-duty-la001"])
            put_record(service, "LA001", "CASE-1", "9990000018")
            put_record(service, "LA001", "CASE-2", "9990000026", plan="LAC")
            ed_lookup(service, "9990000018", ods="RXX02", name="Nurse Ava Example")
            ed_lookup(service, "9990000026", name="Dr Lee Example")
            ed_lookup(service, "9990000018", name="Dr Test Example")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(service.url + "/la/sign-in")
                page.screenshot(path=OUT / "la-sign-in.png", full_page=True)
                page.locator("input[name=council][value=LA001]").check()
                page.get_by_role("button", name="Continue to your council sign-in").click()
                page.get_by_placeholder("sub").fill(sam)
                page.get_by_role("button", name="Authorize").click()
                page.wait_for_url("**/la/notifications")
                page.screenshot(path=OUT / "la-notifications.png", full_page=True)
                page.locator("#notifications tbody tr a").first.click()
                page.screenshot(path=OUT / "la-notification.png", full_page=True)
                page.get_by_role("button", name="Acknowledge").click()
                page.get_by_role("link", name="Look up a child").click()
                page.get_by_label("NHS number").fill("999 000 0018")
                page.get_by_role("button", name="Look up").click()
                page.screenshot(path=OUT / "la-child.png", full_page=True)
                other = browser.new_page(viewport={"width": 1100, "height": 800})
                pat = provider.person("pat@la001.example", name="Pat Example", groups=["staff"])
                other.goto(service.url + "/la/sign-in")
                other.locator("input[name=council][value=LA001]").check()
                other.get_by_role("button", name="Continue to your council sign-in").click()
                other.get_by_placeholder("sub").fill(pat)
                other.get_by_role("button", name="Authorize").click()
                other.wait_for_url("**/la/sign-in/callback**")
                other.screenshot(path=OUT / "la-sign-in-refused.png", full_page=True)
                browser.close()
        finally:
            service.stop()
            provider.stop()


def clinician_view() -> None:
    """The clinician view (/ed/): opened from a CDS card's SMART link through the test EHR, and the dev sign-in."""
    OUT.mkdir(parents=True, exist_ok=True)
    ehr = EhrThread(Ehr()).start()
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry.yaml"
        registry.write_text(registry_with_smart(ehr.ehr))
        service = ServiceProcess(Path(tmp), env={"CPIS_REGISTRY": str(registry)}).start()
        try:
            put_record(service, "LA001", "CASE-1", "9990000018")
            ed_lookup(service, "9990000018", ods="RXX02", name="Nurse Ava Example")
            link = smart_card_link(service, "9990000018")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(ehr.ehr.launch_url(link["url"], ehr.ehr.new_launch(link["appContext"], patient="pat-7")))
                page.wait_for_url("**/ed/children/*")
                page.screenshot(path=OUT / "ed-child.png", full_page=True)
                page.get_by_role("link", name="Look up another child").click()
                page.screenshot(path=OUT / "ed-lookup.png", full_page=True)
                page.context.clear_cookies()
                page.goto(service.url + "/ed/sign-in")
                page.screenshot(path=OUT / "ed-sign-in.png", full_page=True)
                browser.close()
        finally:
            service.stop()
            ehr.stop()


if __name__ == "__main__":
    main()
    clinician_view()
