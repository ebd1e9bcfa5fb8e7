"""Browser tests: Playwright driving Debian's chromium against `cpis-bridge serve` run as a subprocess. Without
chromium these fail (CI installs it); Playwright's own browser download is not used."""

from __future__ import annotations

import json
import shutil
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.support.service import ServiceProcess
from tests.support.world import token

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
_axe = Axe()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(tmp_path_factory.mktemp("browser"), env={"CPIS_LOG_FORMAT": "json"})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (apt-get install -y chromium); the browser tests need it")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=CHROMIUM)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Pages in fresh browser contexts; a script error on any of them (a missing or broken asset) fails the test."""
    contexts = []
    errors: list[str] = []

    def make(**options: Any) -> Page:
        ctx = browser.new_context(**options)
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    yield make
    for ctx in contexts:
        ctx.close()
    assert errors == [], "script errors in the page"


def assert_accessible(page: Page, state: str) -> None:
    """axe-core finds no violation on the page as it is now."""
    results = _axe.run(page)
    violations = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in results.response["violations"]]
    assert violations == [], f"{state}: {violations}"


def api(
    service: ServiceProcess, method: str, path: str, tok: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        service.url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def put_record(service: ServiceProcess, la: str, local_id: str, nhs: str, plan: str = "CPP") -> None:
    status, _ = api(
        service,
        "PUT",
        f"/v1/records/{local_id}",
        token("local-authority", la),
        {
            "localId": local_id,
            "planType": plan,
            "nhsNumber": nhs,
            "dateOfBirth": "2016-04-02",
            "startDate": "2026-01-10",
        },
    )
    assert status in (200, 201)


def ed_lookup(service: ServiceProcess, nhs: str, ods: str = "RXX01", name: str = "Dr Test Example") -> None:
    """An unscheduled CareTeam search by an ED clinician: an access, and a notification for each LA with a plan."""
    tok = token("care-setting", ods, name=name, role_code="R8000")
    status, _ = api(service, "GET", "/fhir/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number%7C" + nhs, tok)
    assert status == 200


def sign_in(page: Page, service: ServiceProcess, council: str, name: str = "Sam Duty") -> None:
    page.goto(service.url + "/la/sign-in")
    page.get_by_label(council).check()
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/la/notifications")


def tab_to(page: Page, matches: Callable[[Page], bool], limit: int = 60) -> None:
    """Press Tab until ``matches`` holds for the focused element (keyboard only, as a person would)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if matches(page):
            return
    raise AssertionError("the keyboard never reached the element")


def focused(page: Page, text: str) -> bool:
    """The keyboard focus is on a control (link, button, field) whose text includes ``text``."""
    return bool(
        page.evaluate(
            "t => { const e = document.activeElement;"
            " return !!e && e.matches('a, button, input, select, textarea')"
            " && (e.innerText || e.value || '').includes(t) }",
            text,
        )
    )


def smart_card_link(service: ServiceProcess, nhs: str, ods: str = "RXX01") -> dict[str, Any]:
    """A patient-view hook call by the EHR, as Dr Sam Launch: the first card's SMART link."""
    hook = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "PractitionerRole/pr-7", "patientId": "pat-7"},
        "prefetch": {
            "patient": {
                "resourceType": "Patient",
                "id": "pat-7",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
            },
            "user": {"resourceType": "PractitionerRole", "id": "pr-7", "practitioner": {"display": "Dr Sam Launch"}},
        },
    }
    status, body = api(service, "POST", "/cds-services/cpis-patient-view", token("care-setting", ods), hook)
    assert status == 200 and body["cards"]
    (link,) = body["cards"][0]["links"]
    assert link["type"] == "smart"
    return dict(link)
