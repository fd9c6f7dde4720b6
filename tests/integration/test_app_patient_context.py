"""A patient launch shows that patient only, even when the SMART server does not filter.

A standard SMART server's FHIR proxy need not narrow a patient-scoped token's searches to
the patient (issue 13 found the app listing 49 studies of many patients under one patient's
banner when launched from such a server). Here ``cxr dev-ehr`` runs with its TEST-ONLY
``CXR_DEV_EHR_PROXY_FILTER=false``: it checks tokens and scopes but answers a patient token
with every patient's resources. HAPI holds studies of several patients (and, from the other
tests of the session, identical images filed under other Patients, the nearest neighbours
``$similar`` could return). Real Chromium launches the app for one patient; no other patient's
study, report, image or similar case may appear, and opening another patient's study by URL
is refused.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from fhir_service.ops.stack import dev_ehr_process, service_process, start_dev_ehr, stop_dev_ehr
from fhir_service.settings import Settings
from tests.dev_ehr.smart_client import SmartClient
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for
from tests.integration.test_app_browser import CHROMIUM, chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Response

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)"),
]

__all__ = ["chromium"]  # the module-scoped browser fixture, shared

SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "app-patient-context"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
#: Manifest rows 1..3: three studies of NIH patient 13 (the launch patient).
MINE = (1, 2, 3)
#: Rows 0, 6, 7: NIH patients 3, 32 and 1.
OTHERS = (0, 6, 7)


@dataclass
class Mixed:
    dev_ehr: Settings
    patient: str
    mine: list[str]
    others: list[str]

    @property
    def launch_url(self) -> str:
        return f"{self.dev_ehr.dev_ehr_url}/launch/ehr?patient={self.patient}"


def unfiltered_settings(test_settings: Settings, test_data_dir: Path) -> Settings:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    # 18002/18004/18005 + offset belong to the other dev EHRs of the test run.
    return test_settings.model_copy(
        update={
            "data_dir": test_data_dir / "dev-ehr-unfiltered",
            "dev_ehr_port": 18006 + offset,
            "dev_ehr_proxy_filter": False,
        }
    )


@pytest.fixture(scope="module")
def mixed(stack: Stack, test_settings: Settings, test_data_dir: Path) -> Iterator[Mixed]:
    tag = unique_suffix()
    mine = [stack.post_study(i, tag=tag) for i in MINE]
    others = [stack.post_study(i, tag=tag) for i in OTHERS]
    for sid in [*mine, *others]:
        wait_for(f"a report for ImagingStudy/{sid}", functools.partial(stack.reports, sid), 300)
    patient = str(stack.fhir.read("ImagingStudy", mine[0])["subject"]["reference"]).split("/")[-1]
    settings = unfiltered_settings(test_settings, test_data_dir)
    stop_dev_ehr(settings)
    start_dev_ehr(settings)
    try:
        yield Mixed(settings, patient, mine, others)
    finally:
        stop_dev_ehr(settings)


@dataclass
class Seen:
    """Every JSON answer of ``/app/api`` and every image URL the page loaded."""

    api: list[tuple[str, int, Any]]
    images: list[tuple[str, int]]

    def study_ids(self) -> set[str]:
        ids: set[str] = set()
        for url, status, body in self.api:
            if status != 200 or not isinstance(body, dict):
                continue
            path = urlsplit(url).path
            if path == "/app/api/worklist":
                ids |= {str(r["id"]) for r in body["studies"]}
            elif path == "/app/api/similar":
                ids |= {str(r["id"]) for r in body["results"]}
            elif path.startswith("/app/api/study/"):
                ids.add(str(body["id"]))
        return ids


@contextmanager
def browsing(browser: Browser, *, refused_ok: bool = False) -> Iterator[tuple[Page, Seen]]:
    """A fresh context; on leaving, no request off 127.0.0.1 and no console error (but the
    browser's own "status of 403/404" lines where refusals are the point)."""
    seen = Seen([], [])
    requests: list[str] = []
    errors: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 800})

    def answered(resp: Response) -> None:
        path = urlsplit(resp.url).path
        if path.startswith("/app/api/image/"):
            seen.images.append((resp.url, resp.status))
        elif path.startswith("/app/api/") and "json" in resp.headers.get("content-type", ""):
            try:
                seen.api.append((resp.url, resp.status, resp.json()))
            except Exception:  # a navigation may discard the body
                seen.api.append((resp.url, resp.status, None))

    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.on("request", lambda r: requests.append(r.url))
        page.on("response", answered)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page, seen
    finally:
        context.close()
    assert [
        u for u in requests if u.startswith("http") and urlsplit(u).hostname not in LOCAL_HOSTS
    ] == []
    if refused_ok:
        errors = [e for e in errors if "status of 403" not in e and "status of 404" not in e]
    assert errors == []


def _studies_of(stack: Stack, patient: str) -> set[str]:
    return {str(s["id"]) for s in stack.fhir.search_all("ImagingStudy", {"patient": patient})}


def test_the_test_server_really_does_not_filter(mixed: Mixed) -> None:
    """The premise: a patient token through this dev EHR reads other patients' studies."""
    with httpx.Client(base_url=mixed.dev_ehr.dev_ehr_url, timeout=60) as http:
        smart = SmartClient(
            http,
            iss=mixed.dev_ehr.dev_ehr_fhir_url,
            redirect_uri=f"{mixed.dev_ehr.service_url}/app/callback",
        )
        token = smart.ehr_launch_token(mixed.patient)
        assert token["patient"] == mixed.patient
        found = smart.fhir("ImagingStudy?_count=500", token["access_token"])
        assert found.status_code == 200
        ids = {e["resource"]["id"] for e in found.json().get("entry", [])}
        assert set(mixed.others) <= ids
        other = smart.fhir(f"ImagingStudy/{mixed.others[0]}", token["access_token"])
        assert other.status_code == 200


def test_a_patient_launch_shows_that_patient_only(
    mixed: Mixed, stack: Stack, chromium: Browser
) -> None:
    allowed = _studies_of(stack, mixed.patient)
    assert allowed == set(mixed.mine)
    with browsing(chromium) as (page, seen):
        page.goto(mixed.launch_url)
        page.wait_for_selector(f"#worklist[data-rendered='{len(mixed.mine)}']")
        assert page.locator("body").get_attribute("data-mode") == "patient"
        polls = int(page.locator("#worklist").get_attribute("data-polls") or 0)
        page.wait_for_selector(f"#worklist[data-polls='{polls + 1}']")
        rows = page.locator("#worklist tbody tr")
        shown = {rows.nth(i).get_attribute("data-study") for i in range(rows.count())}
        assert shown == allowed
        page.screenshot(path=str(SHOTS / "worklist.png"), full_page=True)

        # The viewer, its report, and its similar cases (by study, then by text).
        study = mixed.mine[0]
        with page.expect_response(lambda r: f"/app/api/study/{study}" in r.url) as viewed:
            page.locator(f"#worklist tr[data-study='{study}'] a").click()
        page.wait_for_selector("#findings[data-count='14']")
        page.wait_for_selector("#xray[data-loaded='true']")
        report = viewed.value.json()["report"]
        assert report["id"] in {r["id"] for r in stack.reports(study)}
        page.wait_for_selector(f"#similar-results[data-query='study:{study}']")
        similar = page.locator("#similar-results li")
        by_study = {similar.nth(i).get_attribute("data-study") for i in range(similar.count())}
        assert by_study and by_study <= allowed - {study}
        assert page.locator("#same-patient-filter").is_hidden()
        note = page.locator("#similar-note").inner_text()
        assert "Only this patient's studies are searched and shown" in note
        page.get_by_label("Search by text").fill("left pleural effusion")
        page.get_by_label("Search by text").press("Enter")
        page.wait_for_selector("#similar-results[data-query='left pleural effusion']")
        by_text = page.locator("#similar-results li")
        texts = {by_text.nth(i).get_attribute("data-study") for i in range(by_text.count())}
        assert texts and texts <= allowed
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(SHOTS / "study.png"), full_page=True)

    assert seen.study_ids() <= allowed
    assert seen.study_ids() >= allowed
    image_ids = {urlsplit(u).path.rsplit("/", 1)[-1] for u, _ in seen.images}
    assert image_ids and image_ids <= allowed


def test_another_patients_study_url_is_refused(
    mixed: Mixed, stack: Stack, chromium: Browser
) -> None:
    other = mixed.others[0]
    log = service_process(stack.settings).log_file
    with browsing(chromium, refused_ok=True) as (page, seen):
        page.goto(mixed.launch_url)
        page.wait_for_selector(f"#worklist[data-rendered='{len(mixed.mine)}']")
        before = log.read_text(errors="replace").count(f"withheld ImagingStudy/{other} ")

        page.goto(f"{mixed.dev_ehr.service_url}/app/study/{other}")
        page.wait_for_selector("#error:not([hidden])")
        assert "outside this launch" in page.locator("#error").inner_text()
        page.wait_for_selector("#similar-note:has-text('unavailable')")
        time.sleep(1)  # let the page's image and similar calls finish
        assert page.locator("#findings li").count() == 0
        assert page.locator("#xray").get_attribute("data-loaded") is None
        assert page.locator("#similar-results li").count() == 0
        assert page.locator("#conclusion").inner_text() == ""
        page.screenshot(path=str(SHOTS / "other-patient-refused.png"), full_page=True)

        # The same session's JSON and images, asked for directly.
        api = f"{mixed.dev_ehr.service_url}/app/api"
        for path, status in (
            (f"study/{other}", 403),
            (f"similar?study={other}", 403),
            (f"image/{other}", 404),
            (f"image/{other}?size=96", 404),
            (f"heatmap/{other}/Effusion", 404),
        ):
            answer = page.request.get(f"{api}/{path}")
            assert answer.status == status, (path, answer.text())
            assert "image/" not in answer.headers.get("content-type", "")

    assert seen.study_ids() <= set(mixed.mine)
    assert [status for url, status in seen.images if other in url] == [404]
    # Refusals are logged by the service.
    assert log.read_text(errors="replace").count(f"withheld ImagingStudy/{other} ") > before
    assert dev_ehr_process(mixed.dev_ehr).log_file.exists()
