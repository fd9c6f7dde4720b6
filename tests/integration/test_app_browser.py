"""The SMART app in a real browser: Debian's Chromium driven by Playwright (its own browser
download disabled), launched from ``cxr dev-ehr`` against the session's real stack.

One test walks the clinician's path (launch → worklist → study → heatmap → similar cases)
so the browser starts once: the build machines are small. Screenshots go to
``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fhir_service.app_ui.clinical import CRITICAL_FINDINGS
from fhir_service.builders import TERMINOLOGY
from fhir_service.settings import Settings
from fhir_service.stack import start_dev_ehr, stop_dev_ehr
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
#: Manifest rows 1..3: three studies of NIH patient 13.
ROWS = (1, 2, 3)
_NIH = TERMINOLOGY.code_system_url("nih_label")


@dataclass
class Launched:
    settings: Settings
    patient: str
    studies: list[str]

    @property
    def launch_url(self) -> str:
        return f"{self.settings.dev_ehr_url}/launch/ehr?patient={self.patient}"


def dev_ehr_settings(test_settings: Settings) -> Settings:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    # 18002 + offset is test_dev_ehr's; this module's dev EHR sits beside it.
    return test_settings.model_copy(update={"dev_ehr_port": 18004 + offset})


@pytest.fixture(scope="module")
def launched(stack: Stack, test_settings: Settings) -> Iterator[Launched]:
    tag = unique_suffix()
    studies = [stack.post_study(i, tag=tag) for i in ROWS]
    for sid in studies:
        wait_for(f"a report for ImagingStudy/{sid}", functools.partial(stack.reports, sid), 300)
    subject = stack.fhir.read("ImagingStudy", studies[0])["subject"]["reference"]
    settings = dev_ehr_settings(test_settings)
    stop_dev_ehr(settings)
    start_dev_ehr(settings)
    try:
        yield Launched(settings, subject.split("/")[-1], studies)
    finally:
        stop_dev_ehr(settings)


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


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)")
def test_app_in_chromium(launched: Launched, stack: Stack) -> None:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS / "app", ignore_errors=True)
    shots = ARTIFACTS / "app"
    shots.mkdir(parents=True)
    requests: list[str] = []
    console_errors: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.on("request", lambda r: requests.append(r.url))
            page.on(
                "console",
                lambda m: console_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: console_errors.append(str(e)))

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
            context.close()
        finally:
            browser.close()

    (shots / "timings.txt").write_text(
        f"launch→worklist {launch_s:.2f} s\nclick→overlay {overlay_s:.2f} s\n"
    )
    external = [
        u for u in requests if u.startswith("http") and urlsplit(u).hostname not in LOCAL_HOSTS
    ]
    assert external == []
    assert console_errors == []
