"""The SMART app in a real browser: Debian's Chromium driven by Playwright (its own browser
download disabled), launched from ``cxr dev-ehr`` against the session's real stack.

The browser starts once per module (the build machines are small); each test gets a fresh
context (no shared cookies). One test walks the clinician's path from a patient launch
(worklist → study → heatmap → similar cases); one makes a user-level launch (all recent
studies, several patients); one a standalone launch through the patient picker against a
dev EHR whose access tokens live 31 s, so the app must refresh them. Every test fails on a
console error or a request leaving 127.0.0.1. Screenshots go to ``test-artifacts/app/``
(git-ignored).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

import pytest

from fhir_service.app_ui.clinical import CRITICAL_FINDINGS
from fhir_service.fhir.terminology import TERMINOLOGY
from fhir_service.ops.stack import dev_ehr_process, start_dev_ehr, stop_dev_ehr
from fhir_service.settings import Settings
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)"),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
SHOTS = ARTIFACTS / "app"
#: Manifest rows 1..3: three studies of NIH patient 13.
ROWS = (1, 2, 3)
#: Manifest row 0: a study of NIH patient 3, so a user-level worklist spans two patients.
OTHER_ROW = 0
#: Access tokens of the refresh test's dev EHR: the app refreshes 30 s before expiry, so
#: such a token is fresh for one second and every later worklist poll needs a refresh.
SHORT_TOKEN_LIFETIME_S = 31
_NIH = TERMINOLOGY.code_system_url("nih_label")


@dataclass
class Launched:
    settings: Settings
    patient: str
    studies: list[str]
    other_patient: str
    other_study: str

    @property
    def launch_url(self) -> str:
        return f"{self.settings.dev_ehr_url}/launch/ehr?patient={self.patient}"


def dev_ehr_settings(test_settings: Settings) -> Settings:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    # 18002 + offset is test_dev_ehr's; this module's dev EHR sits beside it.
    return test_settings.model_copy(update={"dev_ehr_port": 18004 + offset})


def _subject(stack: Stack, study: str) -> str:
    return str(stack.fhir.read("ImagingStudy", study)["subject"]["reference"]).split("/")[-1]


@pytest.fixture(scope="module")
def launched(stack: Stack, test_settings: Settings) -> Iterator[Launched]:
    tag = unique_suffix()
    studies = [stack.post_study(i, tag=tag) for i in ROWS]
    other = stack.post_study(OTHER_ROW, tag=tag)
    for sid in [*studies, other]:
        wait_for(f"a report for ImagingStudy/{sid}", functools.partial(stack.reports, sid), 300)
    settings = dev_ehr_settings(test_settings)
    stop_dev_ehr(settings)
    start_dev_ehr(settings)
    try:
        yield Launched(
            settings, _subject(stack, studies[0]), studies, _subject(stack, other), other
        )
    finally:
        stop_dev_ehr(settings)


@pytest.fixture
def short_lived_dev_ehr(launched: Launched, test_data_dir: Path) -> Iterator[Settings]:
    """A second dev EHR (own port and data dir, so its own pid file, keys and log) whose
    access tokens live ``SHORT_TOKEN_LIFETIME_S``."""
    settings = launched.settings.model_copy(
        update={
            "data_dir": test_data_dir / "dev-ehr-short-lived",
            "dev_ehr_port": launched.settings.dev_ehr_port + 1,
            "dev_ehr_access_token_lifetime_s": SHORT_TOKEN_LIFETIME_S,
        }
    )
    stop_dev_ehr(settings)
    dev_ehr_process(settings).log_file.unlink(missing_ok=True)
    start_dev_ehr(settings)
    try:
        yield settings
    finally:
        stop_dev_ehr(settings)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    # Shared by every browser module (imported): screenshots are overwritten, never wiped.
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def browsing(browser: Browser) -> Iterator[Page]:
    """A fresh context and page; on leaving, no console error and no request off 127.0.0.1."""
    requests: list[str] = []
    console_errors: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.on("request", lambda r: requests.append(r.url))
        page.on(
            "console",
            lambda m: (
                console_errors.append(f"{m.text} at {m.location.get('url')}")
                if m.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda e: console_errors.append(str(e)))
        yield page
    finally:
        context.close()
    external = [
        u for u in requests if u.startswith("http") and urlsplit(u).hostname not in LOCAL_HOSTS
    ]
    assert external == []
    assert console_errors == []


def worklist_rows(page: Page) -> list[dict[str, str | None]]:
    rows = page.locator("#worklist tbody tr")
    return [
        {
            "study": rows.nth(i).get_attribute("data-study"),
            "status": rows.nth(i).get_attribute("data-status"),
            "patient": rows.nth(i).get_attribute("data-patient"),
        }
        for i in range(rows.count())
    ]


def expected_order(stack: Stack, studies: list[str]) -> list[str]:
    """Urgency computed here from the raw Observations, independently of the app."""

    def key(sid: str) -> tuple[int, float, float]:
        values: dict[str, tuple[float, float]] = {}
        for obs in stack.fhir.search_all("Observation", {"derived-from": f"ImagingStudy/{sid}"}):
            label = next(c["code"] for c in obs["code"]["coding"] if c["system"] == _NIH)
            threshold = next(
                c["valueQuantity"]["value"]
                for c in obs["component"]
                if c["code"]["coding"][0]["code"] == "operating-threshold"
            )
            values[label] = (obs["valueQuantity"]["value"], threshold)
        ptx, ptx_thr = values["Pneumothorax"]
        return (
            -int(ptx >= ptx_thr),
            -max(values[c][0] for c in CRITICAL_FINDINGS),
            -ptx,
        )

    return sorted(studies, key=key)


CANVAS_DIGEST = """() => {
  const c = document.getElementById('xray');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  return Array.from(d.filter((_, i) => i % 4 !== 3 && i % 64 < 4));
}"""


def changed_fraction(a: list[int], b: list[int]) -> float:
    assert len(a) == len(b) and a
    return sum(1 for x, y in zip(a, b, strict=True) if abs(x - y) > 8) / len(a)


def test_app_in_chromium(launched: Launched, stack: Stack, chromium: Browser) -> None:
    shots = SHOTS
    with browsing(chromium) as page:
        # Launch from the dev EHR: launch → authorize → callback → worklist.
        t0 = time.perf_counter()
        page.goto(launched.launch_url)
        page.wait_for_selector(f"#worklist[data-rendered='{len(launched.studies)}']")
        launch_s = time.perf_counter() - t0
        assert urlsplit(page.url).path == "/app/"
        rows = page.locator("#worklist tbody tr")
        order = [rows.nth(i).get_attribute("data-study") for i in range(rows.count())]
        assert order == expected_order(stack, launched.studies)
        statuses = {rows.nth(i).get_attribute("data-status") for i in range(rows.count())}
        assert statuses == {"done"}
        assert page.locator("body").get_attribute("data-mode") == "patient"
        assert not page.locator("#col-patient").is_visible()
        banner = page.locator("#banner")
        assert banner.is_visible()
        assert "UNTRAINED" in banner.inner_text()
        page.screenshot(path=str(shots / "worklist-1280x800.png"), full_page=True)

        # The study viewer: the X-ray, 14 findings, a heatmap overlay on click.
        top = order[0]
        assert top is not None
        page.locator(f"#worklist tr[data-study='{top}'] a").click()
        page.wait_for_selector("#findings[data-count='14']")
        page.wait_for_selector("#xray[data-loaded='true']")
        assert "preliminary" in page.locator("#report-status").inner_text()
        assert page.locator("#banner").is_visible()
        before = page.evaluate(CANVAS_DIGEST)
        button = page.locator(".finding-button").first
        finding = button.get_attribute("data-finding")
        t1 = time.perf_counter()
        button.click()
        page.wait_for_selector(f"#xray[data-overlay='{finding}']", timeout=180_000)
        overlay_s = time.perf_counter() - t1
        with_overlay = page.evaluate(CANVAS_DIGEST)
        assert changed_fraction(before, with_overlay) > 0.05
        assert button.get_attribute("aria-pressed") == "true"
        # A finding without a stored Media: its CAM is recomputed in the service.
        negative = page.locator(".finding-button:not(:has-text('▲'))").last
        if negative.count():
            other = negative.get_attribute("data-finding")
            with page.expect_response(
                lambda r: f"/app/api/heatmap/{top}/{other}" in r.url, timeout=180_000
            ) as rendered:
                negative.click()
            assert rendered.value.headers["x-cxr-heatmap"] == "rendered"
            page.wait_for_selector(f"#xray[data-overlay='{other}']", timeout=180_000)
            assert changed_fraction(with_overlay, page.evaluate(CANVAS_DIGEST)) > 0.01
            button.click()
            page.wait_for_selector(f"#xray[data-overlay='{finding}']")
        # Opacity 0 shows the bare X-ray again.
        page.evaluate(
            "() => { const o = document.getElementById('opacity'); o.value = '0';"
            " o.dispatchEvent(new Event('input')); }"
        )
        assert changed_fraction(before, page.evaluate(CANVAS_DIGEST)) < 0.01
        page.evaluate(
            "() => { const o = document.getElementById('opacity'); o.value = '60';"
            " o.dispatchEvent(new Event('input')); }"
        )

        # Similar cases: this study's neighbours, then a text query changes them.
        page.wait_for_selector(f"#similar-results[data-query='study:{top}']")
        similar = page.locator("#similar-results li")
        assert similar.count() >= 1

        def listed() -> list[str]:
            items = page.locator("#similar-results li")
            return [items.nth(i).inner_text() for i in range(items.count())]

        by_study = listed()
        page.get_by_label("Search by text").fill("left pleural effusion")
        page.get_by_label("Search by text").press("Enter")
        page.wait_for_selector("#similar-results[data-query='left pleural effusion']")
        by_text = listed()
        assert by_text and by_text != by_study
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / "study-1280x800.png"), full_page=True)

        # Tablet width: the same page, one column where it must.
        page.set_viewport_size({"width": 768, "height": 1024})
        page.screenshot(path=str(shots / "study-768x1024.png"), full_page=True)

    (shots / "timings.txt").write_text(
        f"launch→worklist {launch_s:.2f} s\nclick→overlay {overlay_s:.2f} s\n"
    )


#: Where a status sorts in the worklist (clinical.worklist): results, then pending, then failed.
_STATUS_RANK = {"done": 0, "pending": 1, "failed": 2}


def test_user_level_launch_in_chromium(launched: Launched, stack: Stack, chromium: Browser) -> None:
    ours = [*launched.studies, launched.other_study]
    with browsing(chromium) as page:
        # The dev EHR's launcher offers the worklist launch: no patient in context.
        page.goto(f"{launched.settings.dev_ehr_url}/launch")
        page.locator("#user-launch").click()
        for sid in ours:
            page.wait_for_selector(f"#worklist tr[data-study='{sid}'][data-status='done']")
        assert urlsplit(page.url).path == "/app/"
        assert page.locator("body").get_attribute("data-mode") == "user"
        assert page.locator("#col-patient").is_visible()
        assert "All patients" in page.locator("#patient").inner_text()

        rows = worklist_rows(page)
        assert len(rows) <= 50
        # Several patients, each row with its patient; urgency order across them, computed
        # here from the raw Observations.
        by_study = {r["study"]: r for r in rows}
        assert {by_study[s]["patient"] for s in ours} == {
            launched.patient,
            launched.other_patient,
        }
        shown = [r["study"] for r in rows if r["study"] in ours]
        assert shown == expected_order(stack, ours)
        ranks = [_STATUS_RANK[str(r["status"])] for r in rows]
        assert ranks == sorted(ranks), "done, then pending, then failed"
        cell = page.locator(f"#worklist tr[data-study='{launched.other_study}'] .patient-cell")
        assert launched.other_patient in cell.inner_text()
        page.screenshot(path=str(SHOTS / "worklist-user-1280x800.png"), full_page=True)

        # The same refresh without reload as a patient launch.
        polls = int(page.locator("#worklist").get_attribute("data-polls") or 0)
        page.wait_for_selector(f"#worklist[data-polls='{polls + 1}']")

        # The viewer and similar cases across patients.
        with page.expect_response(lambda r: "/app/api/similar?" in r.url) as answered:
            page.locator(f"#worklist tr[data-study='{launched.other_study}'] a").click()
        page.wait_for_selector("#findings[data-count='14']")
        page.wait_for_selector("#xray[data-loaded='true']")
        assert launched.other_patient in page.locator("#study-meta").inner_text()
        page.wait_for_selector(f"#similar-results[data-query='study:{launched.other_study}']")
        results = answered.value.json()["results"]
        assert results, "similar cases of a user-level launch"
        items = page.locator("#similar-results li")
        assert items.count() == len(results)
        for i, result in enumerate(results):
            # Each match shows its patient; "same patient" is the viewed study's patient.
            patient = result["patient"]
            assert items.nth(i).get_attribute("data-patient") == patient["id"]
            assert patient["name"] in items.nth(i).inner_text()
            assert result["same_patient"] is (patient["id"] == launched.other_patient)
        assert any(not r["same_patient"] for r in results), "other patients' studies are visible"
        assert "every patient" in page.locator("#similar-note").inner_text()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(SHOTS / "study-user-1280x800.png"), full_page=True)

        # The same-patient toggle has $similar leave the viewed study's patient out.
        with page.expect_response(
            lambda r: "/app/api/similar?" in r.url and "exclude-same-patient=true" in r.url
        ) as toggled:
            page.get_by_label("Include same patient").uncheck()
        excluded = toggled.value.json()["results"]
        assert [r["same_patient"] for r in excluded] == [False] * len(excluded)
        page.wait_for_selector("#similar-results li[data-same-patient='true']", state="detached")


def test_standalone_launch_and_token_refresh_in_chromium(
    launched: Launched, short_lived_dev_ehr: Settings, chromium: Browser
) -> None:
    dev_ehr = short_lived_dev_ehr
    log = dev_ehr_process(dev_ehr).log_file
    refreshes = f"grant_type=refresh_token client_id=cxr-app patient={launched.patient} "
    with browsing(chromium) as page:
        # Standalone: the app is opened with iss only; the EHR's picker chooses the patient.
        app = f"{launched.settings.service_url}/app/launch"
        page.goto(f"{app}?{urlencode({'iss': dev_ehr.dev_ehr_fhir_url})}")
        page.wait_for_selector("text=Choose a patient")
        page.screenshot(path=str(SHOTS / "standalone-picker-1280x800.png"), full_page=True)
        page.locator(f"button[name='patient'][value='{launched.patient}']").click()
        page.wait_for_selector(f"#worklist[data-rendered='{len(launched.studies)}']")
        assert urlsplit(page.url).path == "/app/"
        assert page.locator("body").get_attribute("data-mode") == "patient"
        assert sorted(r["study"] or "" for r in worklist_rows(page)) == sorted(launched.studies)
        assert "grant_type=authorization_code client_id=cxr-app" in log.read_text()

        # Access tokens live 31 s, the app refreshes 30 s before expiry: the polls after the
        # first second need refreshed tokens. Two refreshes in the dev EHR's log mean the
        # rotated refresh token was used too (a replayed one would revoke the grant).
        wait_for("two refresh_token grants", lambda: log.read_text().count(refreshes) >= 2, 90)
        polls = int(page.locator("#worklist").get_attribute("data-polls") or 0)
        page.wait_for_selector(f"#worklist[data-polls='{polls + 1}']")
        assert page.locator("#error").is_hidden()
        assert "token refused" not in log.read_text()
        assert sorted(r["study"] or "" for r in worklist_rows(page)) == sorted(launched.studies)
