"""Screenshots of the web views for the README (docs/screenshots/): `python -m tests.browser.screenshots`.
Runs the service as a subprocess with invented data, as the browser tests do."""

from __future__ import annotations

import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.browser.conftest import CHROMIUM, ed_lookup, put_record, sign_in
from tests.support.service import ServiceProcess

OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
LA1 = "Example Borough Council Children's Services"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        service = ServiceProcess(Path(tmp)).start()
        try:
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
                sign_in(page, service, LA1)
                page.screenshot(path=OUT / "la-notifications.png", full_page=True)
                page.locator("#notifications tbody tr a").first.click()
                page.screenshot(path=OUT / "la-notification.png", full_page=True)
                page.get_by_role("button", name="Acknowledge").click()
                page.get_by_role("link", name="Look up a child").click()
                page.get_by_label("NHS number").fill("999 000 0018")
                page.get_by_role("button", name="Look up").click()
                page.screenshot(path=OUT / "la-child.png", full_page=True)
                browser.close()
        finally:
            service.stop()


if __name__ == "__main__":
    main()
