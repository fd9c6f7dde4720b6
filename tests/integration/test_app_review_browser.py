"""The radiologist in the loop, in real Chromium against the real stack (issue 18): agree /
disagree / uncertain on findings from a patient launch of ``cxr dev-ehr`` (which grants the
write scopes), and the FHIR resources checked in HAPI afterwards — statuses, the reviewer's
own Observations, Provenance with the Device as author and the Practitioner as verifier, the
report final with its interpreter once every finding is reviewed. Timings go to
``test-artifacts/app/review-timings.txt``."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from fhir_service.ops.stack import start_dev_ehr, stop_dev_ehr
from fhir_service.settings import Settings
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for
from tests.integration.test_app_browser import (
    CHROMIUM,
    SHOTS,
    browsing,
    chromium,
    expected_order,
    worklist_rows,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)"),
]
__all__ = ["chromium"]  # the module-scoped browser fixture, shared

#: Manifest row 4: a study of its own patient, reviewed here and nowhere else.
REVIEW_ROW = 4
#: Manifest rows 1..3: three studies of one patient (posted under a tag of this module).
PRIORITY_ROWS = (1, 2, 3)
REVIEWER = "Practitioner/cxr-dev-radiologist"


@dataclass
class ReviewStack:
    settings: Settings
    patient: str
    study: str
    #: Three studies of another patient, for the priority order.
    ordered: list[str]


@pytest.fixture(scope="module")
def review_stack(stack: Stack, test_settings: Settings) -> Iterator[ReviewStack]:
    study = stack.post_study(REVIEW_ROW, tag=unique_suffix())
    tag = unique_suffix()
    ordered = [stack.post_study(i, tag=tag) for i in PRIORITY_ROWS]
    for sid in [study, *ordered]:
        wait_for(f"a report for ImagingStudy/{sid}", functools.partial(stack.reports, sid), 300)
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    settings = test_settings.model_copy(update={"dev_ehr_port": 18006 + offset})
    stop_dev_ehr(settings)
    start_dev_ehr(settings)
    patient = str(stack.fhir.read("ImagingStudy", study)["subject"]["reference"]).split("/")[-1]
    try:
        yield ReviewStack(settings, patient, study, ordered)
    finally:
        stop_dev_ehr(settings)


def _open_study(page: Page, rs: ReviewStack) -> None:
    page.goto(f"{rs.settings.dev_ehr_url}/launch/ehr?patient={rs.patient}")
    page.wait_for_selector(f"#worklist tr[data-study='{rs.study}'][data-reviewed='false']")
    page.locator(f"#worklist tr[data-study='{rs.study}'] a").click()
    page.wait_for_selector("#findings[data-count='14']")


def _decide(page: Page, finding: str, verdict: str, comment: str = "") -> float:
    item = page.locator(f"#findings li[data-finding='{finding}']")
    before = int(item.get_attribute("data-reviews") or 0)
    if comment:
        item.locator(".review-comment").fill(comment)
    t0 = time.perf_counter()
    item.locator(f"button[data-verdict='{verdict}']").click()
    saved = f"#findings li[data-finding='{finding}'][data-reviews='{before + 1}']"
    refused = f"#findings li[data-finding='{finding}'] .review-status:has-text('Not saved')"
    page.wait_for_selector(f"{saved}, {refused}")
    elapsed = time.perf_counter() - t0
    if not page.locator(saved).count():
        page.screenshot(path=str(SHOTS / f"review-refused-{finding}.png"))
        raise AssertionError(
            f"{verdict} on {finding}: {item.locator('.review-status').inner_text()}"
        )
    return elapsed


def _verifier_provenance(stack: Stack, target: str) -> list[dict[str, Any]]:
    return [
        p
        for p in stack.fhir.search_all("Provenance", {"target": target})
        if any(a["type"]["coding"][0]["code"] == "verifier" for a in p["agent"])
    ]


def test_review_in_chromium_lands_in_hapi(
    review_stack: ReviewStack, stack: Stack, chromium: Browser
) -> None:
    rs = review_stack
    with browsing(chromium) as page:
        _open_study(page, rs)
        items = page.locator("#findings li")
        findings = [str(items.nth(i).get_attribute("data-finding")) for i in range(14)]
        obs = {
            f: str(
                page.locator(f"#findings li[data-finding='{f}']").get_attribute("data-observation")
            )
            for f in findings
        }
        clicks = [_decide(page, findings[0], "agree")]
        clicks.append(_decide(page, findings[1], "disagree", "no such finding on this film"))
        clicks.append(_decide(page, findings[2], "uncertain", "rotated"))
        agreed = stack.fhir.read("Observation", obs[findings[0]])
        disagreed = stack.fhir.read("Observation", obs[findings[1]])
        unsure = stack.fhir.read("Observation", obs[findings[2]])
        assert (agreed["status"], disagreed["status"], unsure["status"]) == (
            "final",
            "amended",
            "preliminary",
        )
        assert "no such finding on this film" in disagreed["note"][-1]["text"]
        assert disagreed["valueQuantity"]["value"] is not None  # the AI value stays
        human = list(
            stack.fhir.search_all(
                "Observation", {"derived-from": f"Observation/{obs[findings[1]]}"}
            )
        )
        assert len(human) == 1 and human[0]["performer"] == [{"reference": REVIEWER}]
        ai_code = disagreed["interpretation"][0]["coding"][0]["code"]
        assert (
            human[0]["interpretation"][0]["coding"][0]["code"]
            == {"POS": "NEG", "NEG": "POS"}[ai_code]
        )
        (prov,) = _verifier_provenance(stack, f"Observation/{obs[findings[1]]}")
        roles = {a["type"]["coding"][0]["code"]: a["who"]["reference"] for a in prov["agent"]}
        assert roles == {"author": disagreed["device"]["reference"], "verifier": REVIEWER}
        assert (
            "disagreed" in page.locator(f"#findings li[data-finding='{findings[1]}']").inner_text()
        )

        report_id = stack.reports(rs.study)[0]["id"]
        assert stack.fhir.read("DiagnosticReport", report_id)["status"] == "preliminary"
        for f in findings[3:]:
            clicks.append(_decide(page, f, "agree"))
        report = stack.fhir.read("DiagnosticReport", report_id)
        assert report["status"] == "final"
        assert report["resultsInterpreter"] == [{"reference": REVIEWER}]
        page.wait_for_selector("#report-status[data-report-status='final']")
        assert "reviewed by cxr-dev-radiologist" in page.locator("#report-status").inner_text()
        page.screenshot(path=str(SHOTS / "study-reviewed-1280x800.png"), full_page=True)

        # A second review of a reviewed finding is kept beside the first.
        clicks.append(_decide(page, findings[0], "disagree", "second look: I see it"))
        assert stack.fhir.read("Observation", obs[findings[0]])["status"] == "amended"
        assert stack.fhir.read("DiagnosticReport", report_id)["status"] == "amended"
        reviews = list(
            stack.fhir.search_all(
                "Observation", {"derived-from": f"Observation/{obs[findings[0]]}"}
            )
        )
        assert len(reviews) == 2
        assert len(_verifier_provenance(stack, f"Observation/{obs[findings[0]]}")) == 2

        # The worklist tells reviewed studies apart.
        page.goto(f"{rs.settings.service_url}/app/")
        page.wait_for_selector(f"#worklist tr[data-study='{rs.study}'][data-reviewed='true']")
    clicks.sort()
    (SHOTS / "review-timings.txt").write_text(
        f"click→review shown (median of {len(clicks)}) {clicks[len(clicks) // 2]:.3f} s\n"
        f"click→review shown (max) {clicks[-1]:.3f} s\n"
    )


def _order_task(stack: Stack, study: str, priority: str) -> str:
    subject = stack.fhir.read("ImagingStudy", study)["subject"]
    task = stack.fhir.create(
        {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "priority": priority,
            "code": {"text": "Read chest X-ray"},
            "focus": {"reference": f"ImagingStudy/{study}"},
            "for": subject,
        }
    )
    return f"Task/{task['id']}"


def test_worklist_order_with_mixed_priorities_in_chromium(
    review_stack: ReviewStack, stack: Stack, chromium: Browser
) -> None:
    rs = review_stack
    by_ai = expected_order(stack, rs.ordered)
    # The least AI-urgent study is ordered stat, the middle one urgent; the most AI-urgent has
    # no order priority: clinical priority must put it last.
    stat = _order_task(stack, by_ai[-1], "stat")
    urgent = _order_task(stack, by_ai[1], "urgent")
    patient = str(stack.fhir.read("ImagingStudy", by_ai[0])["subject"]["reference"]).split("/")[-1]
    with browsing(chromium) as page:
        page.goto(f"{rs.settings.dev_ehr_url}/launch/ehr?patient={patient}")
        page.wait_for_selector(f"#worklist[data-rendered='{len(rs.ordered)}']")
        order = [r["study"] for r in worklist_rows(page)]
        assert order == [by_ai[-1], by_ai[1], by_ai[0]]
        rows = page.locator("#worklist tbody tr")
        assert [rows.nth(i).get_attribute("data-priority") for i in range(3)] == [
            "stat",
            "urgent",
            "routine",
        ]
        why = [rows.nth(i).locator(".why").inner_text() for i in range(3)]
        assert why[0].startswith(f"STAT order ({stat}); then AI")
        assert why[1].startswith(f"URGENT order ({urgent}); then AI")
        assert why[2].startswith("no order priority (routine); then AI")
        page.screenshot(path=str(SHOTS / "worklist-priority-1280x800.png"), full_page=True)


def test_search_by_image_in_chromium(
    review_stack: ReviewStack, stack: Stack, chromium: Browser
) -> None:
    rs = review_stack
    rec = stack.records[REVIEW_ROW]
    image = stack.settings.shared_dir / "data" / "nih-sample" / rec.image_index
    with browsing(chromium) as page:
        page.goto(f"{rs.settings.dev_ehr_url}/launch/ehr?patient={rs.patient}")
        page.wait_for_selector(f"#worklist tr[data-study='{rs.study}']")
        page.goto(f"{rs.settings.service_url}/app/study/{rs.study}")
        page.wait_for_selector(f"#similar-results[data-query='study:{rs.study}']", state="attached")
        with page.expect_response(lambda r: "/app/api/similar-image" in r.url) as answered:
            page.set_input_files("#similar-image", str(image))
        page.wait_for_selector(f"#similar-results[data-query='image:{image.name}']")
        results = answered.value.json()["results"]
        # The study's own pixels: it is the best match, and only the launch patient's studies
        # come back.
        assert results[0]["id"] == rs.study
        assert results[0]["score"] > 0.99
        assert all(r["same_patient"] for r in results)
        assert "similar to " + image.name in page.locator("#similar-note").inner_text()
        # Not an image: a clear refusal, nothing searched.
        bad = SHOTS / "not-an-image.txt"
        bad.write_text("hello")
        page.set_input_files("#similar-image", str(bad))
        page.wait_for_selector("#similar-note:has-text('Search by image failed')")
        assert "not a PNG, JPEG or DICOM image" in page.locator("#similar-note").inner_text()


#: Manifest row 5: the image uploaded through the app.
UPLOAD_ROW = 5


def test_upload_and_read_in_chromium(
    review_stack: ReviewStack, stack: Stack, chromium: Browser
) -> None:
    rs = review_stack
    image = (
        stack.settings.shared_dir / "data" / "nih-sample" / stack.records[UPLOAD_ROW].image_index
    )
    with browsing(chromium) as page:
        page.goto(f"{rs.settings.dev_ehr_url}/launch/ehr?patient={rs.patient}")
        page.wait_for_selector("#upload:not([hidden])")
        t0 = time.perf_counter()
        page.set_input_files("#upload-image", str(image))
        page.wait_for_url("**/app/study/**")
        study = page.url.split("/app/study/")[1].split("?")[0]
        page.wait_for_selector("#findings[data-count='14']", timeout=600_000)
        upload_to_report_s = time.perf_counter() - t0
        created = stack.fhir.read("ImagingStudy", study)
        assert created["subject"]["reference"] == f"Patient/{rs.patient}"
        media = list(stack.fhir.search_all("Media", {"part-of": f"ImagingStudy/{study}"}))
        assert any(m["content"].get("title") == image.name for m in media)
        assert stack.reports(study), "the normal pipeline wrote the report"
        page.wait_for_selector("#xray[data-loaded='true']")
        page.screenshot(path=str(SHOTS / "uploaded-study-1280x800.png"), full_page=True)
    with (SHOTS / "review-timings.txt").open("a") as fh:
        fh.write(f"upload→report shown {upload_to_report_s:.2f} s\n")


def test_adhoc_analysis_without_write_scopes_in_chromium(
    review_stack: ReviewStack, stack: Stack, chromium: Browser
) -> None:
    """A user-level launch may not write: the dropped image goes to ``$analyze`` and its
    findings are shown under a NOT SAVED banner; nothing is uploaded."""
    rs = review_stack
    image = (
        stack.settings.shared_dir / "data" / "nih-sample" / stack.records[UPLOAD_ROW].image_index
    )
    with browsing(chromium) as page:
        posted: list[str] = []
        page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
        page.goto(f"{rs.settings.dev_ehr_url}/launch")
        page.locator("#user-launch").click()
        page.wait_for_selector("#upload[data-saves='false']:not([hidden])")
        assert "not saved" in page.locator("#upload-label").inner_text()
        t0 = time.perf_counter()
        with page.expect_response(lambda r: "/app/api/analyze" in r.url) as answered:
            page.set_input_files("#upload-image", str(image))
        assert answered.value.status == 200, answered.value.text()
        page.wait_for_selector("#adhoc[data-count='14']:not([hidden])")
        analysis_s = time.perf_counter() - t0
        assert "NOT SAVED TO THE RECORD" in page.locator("#adhoc-banner").inner_text()
        assert page.locator("#adhoc-conclusion").inner_text().startswith("NOT SAVED")
        assert page.locator("#banner").is_visible()  # untrained weights: said at the top
        positives = page.locator("#adhoc-findings li[data-positive='true']")
        assert page.locator("#adhoc-findings li[data-positive='true'] img").count() == (
            positives.count()
        )
        assert not [u for u in posted if "/app/api/upload" in u]
        page.screenshot(path=str(SHOTS / "adhoc-analysis-1280x800.png"), full_page=True)
    with (SHOTS / "review-timings.txt").open("a") as fh:
        fh.write(f"ad-hoc analysis shown {analysis_s:.2f} s\n")
