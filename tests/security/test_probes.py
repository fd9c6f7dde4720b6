"""Issue 13's probes of the running stack, kept as regression tests against the real servers:
HAPI, PostgreSQL, ``cxr serve`` with its worker, and a ``cxr dev-ehr`` the app is launched
from (over plain HTTP, following the real redirects; the Chromium tests live in
``tests/integration``).
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from fhir_service.settings import Settings
from subscriptions.bootstrap import SECRET_HEADER
from tests.dev_ehr.smart_client import EHR_SCOPES, SmartClient
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

XSS = b"<!doctype html><script>fetch('/app/api/context').then(r=>r.text()).then(alert)</script>"


def _png16() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(out, "PNG")
    return out.getvalue()


def _cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (64, 64), (10, 20, 30, 40)).save(out, "JPEG")
    return out.getvalue()


def _post(stack: Stack, content: dict[str, Any], *, status: str = "registered") -> tuple[str, str]:
    """A Patient, an ImagingStudy and a Media with ``content``; (patient id, study id).
    ``registered`` studies are not processed by the worker."""
    tag = unique_suffix()
    p, st, m = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": p,
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:cxr:test", "value": tag}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": st,
                "resource": {
                    "resourceType": "ImagingStudy",
                    "status": status,
                    "subject": {"reference": p},
                },
                "request": {"method": "POST", "url": "ImagingStudy"},
            },
            {
                "fullUrl": m,
                "resource": {
                    "resourceType": "Media",
                    "status": "completed",
                    "partOf": [{"reference": st}],
                    "subject": {"reference": p},
                    "content": content,
                },
                "request": {"method": "POST", "url": "Media"},
            },
        ],
    }
    answer = stack.fhir.transaction(bundle)
    ids = [str(e["response"]["location"]).split("/")[1] for e in answer["entry"]]
    return ids[0], ids[1]


def _inline(data: bytes, content_type: str) -> dict[str, Any]:
    return {"contentType": content_type, "data": base64.b64encode(data).decode()}


@pytest.fixture
def launch(dev_ehr: Settings) -> Iterator[Any]:
    """``launch(patient)``: an httpx client signed in to the app by a real EHR launch."""
    clients: list[httpx.Client] = []

    def go(patient: str) -> httpx.Client:
        client = httpx.Client(follow_redirects=True, timeout=60)
        clients.append(client)
        page = client.get(f"{dev_ehr.dev_ehr_url}/launch/ehr", params={"patient": patient})
        assert page.status_code == 200 and page.url.path == "/app/", page.text
        return client

    yield go
    for client in clients:
        client.close()


# --- stored XSS through a Media's declared contentType ---------------------------------------


def test_a_media_of_text_html_is_never_served_from_the_apps_origin(
    stack: Stack, launch: Any
) -> None:
    patient, study = _post(stack, _inline(XSS, "text/html"))
    app = launch(patient)
    api = f"{stack.settings.service_url}/app/api"
    full = app.get(f"{api}/image/{study}")
    assert full.status_code == 422
    assert full.headers["content-type"].startswith("application/json")
    assert full.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in full.headers["content-security-policy"]
    assert b"<script" not in full.content
    thumb = app.get(f"{api}/image/{study}", params={"size": 96})
    assert (thumb.status_code, thumb.headers["content-type"]) == (200, "image/png")
    assert thumb.headers["x-cxr-image"] == "placeholder"
    page = app.get(f"{stack.settings.service_url}/app/study/{study}")
    assert "default-src 'none'" in page.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("make", "content_type", "kind"),
    [
        (_png16, "image/png", "image"),
        (_cmyk_jpeg, "image/jpeg", "image"),
        (lambda: b"GIF89a" + b"\x00" * 20, "image/gif", "placeholder"),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "image/png", "placeholder"),
    ],
    ids=["16-bit-png", "cmyk-jpeg", "broken-gif", "truncated-png"],
)
def test_thumbnails_never_fail(
    stack: Stack, launch: Any, make: Any, content_type: str, kind: str
) -> None:
    """Issue 13: thumbnails of some images answered 500 ("image has wrong mode",
    UnidentifiedImageError)."""
    patient, study = _post(stack, _inline(make(), content_type))
    app = launch(patient)
    thumb = app.get(f"{stack.settings.service_url}/app/api/image/{study}", params={"size": 96})
    assert thumb.status_code == 200, thumb.text
    assert thumb.headers["content-type"] == "image/png"
    assert thumb.headers["x-cxr-image"] == kind
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert img.format == "PNG" and max(img.size) <= 96


# --- $similar open to anyone ------------------------------------------------------------------


def test_similar_is_closed_without_credentials(stack: Stack) -> None:
    for base in (f"{stack.settings.service_url}/fhir", stack.settings.fhir_base_url):
        r = httpx.get(f"{base}/ImagingStudy/$similar", params={"text": "effusion"}, timeout=60)
        assert r.status_code == 401, (base, r.text)


# --- unhandled errors and unbounded bodies ---------------------------------------------------


def test_deeply_nested_json_is_a_400_not_a_500(stack: Stack) -> None:
    service = stack.settings.service_url
    nested = b"[" * 100_000
    similar = httpx.post(
        f"{service}/fhir/ImagingStudy/$similar",
        content=nested,
        headers={
            "Authorization": f"Bearer {stack.settings.service_api_key}",
            "Content-Type": "application/fhir+json",
        },
        timeout=60,
    )
    hook = httpx.put(
        f"{service}/hook/ImagingStudy/x1",
        content=nested,
        headers={SECRET_HEADER: stack.settings.subscription_secret},
        timeout=60,
    )
    for r in (similar, hook):
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["issue"][0]["diagnostics"]


def _endless(sent: list[int], total: int) -> Iterator[bytes]:
    chunk = b"[" * 1_048_576
    for _ in range(total // len(chunk)):
        sent[0] += len(chunk)
        yield chunk


@pytest.mark.parametrize(
    "path", ["/fhir/ImagingStudy/$similar", "/hook/ImagingStudy/x1", "/app/logout"]
)
def test_a_70_mb_body_is_refused_before_it_is_read(stack: Stack, path: str) -> None:
    sent = [0]
    size = 70 * 1_048_576
    t0 = time.perf_counter()
    try:
        r = httpx.post(
            f"{stack.settings.service_url}{path}",
            content=_endless(sent, size),
            headers={
                "Content-Length": str(size),
                SECRET_HEADER: stack.settings.subscription_secret,
            },
            timeout=60,
        )
        assert r.status_code == 413, r.text
        assert r.json()["issue"][0]["code"] == "too-costly"
    except httpx.TransportError:
        pass  # answered and closed while we were still sending: also never read
    assert sent[0] < size, "the whole body went in before the answer"
    assert time.perf_counter() - t0 < 30


def test_the_dev_ehr_token_endpoint_has_a_body_limit_too(dev_ehr: Settings) -> None:
    r = httpx.post(
        f"{dev_ehr.dev_ehr_url}/auth/token",
        content=b"a=" + b"b" * 2_000_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert r.status_code == 413


# --- the dev EHR's token endpoint -------------------------------------------------------------


def _code(smart: SmartClient, patient: str) -> tuple[str, str]:
    launch = smart.ehr_launch(patient)["launch"]
    attempt = smart.authorize(scope=EHR_SCOPES, launch=launch)
    return smart.redirected(attempt.response)["code"], attempt.verifier


def test_a_code_seen_by_someone_else_cannot_be_denied_to_its_client(
    stack: Stack, smart: SmartClient
) -> None:
    patient, _ = _post(stack, _inline(_png16(), "image/png"))
    code, verifier = _code(smart, patient)
    for wrong in (
        smart.exchange(code, "w" * 64),
        smart.exchange(code, verifier, redirect_uri="http://127.0.0.1:1/elsewhere"),
    ):
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    token = smart.exchange(code, verifier)
    assert token.status_code == 200, token.text
    # A replay of the used code still revokes what it issued.
    assert smart.exchange(code, verifier).json()["error"] == "invalid_grant"
    assert smart.fhir(f"Patient/{patient}", token.json()["access_token"]).status_code == 401


def test_a_refused_refresh_does_not_burn_the_grant(stack: Stack, smart: SmartClient) -> None:
    patient, _ = _post(stack, _inline(_png16(), "image/png"))
    first = smart.ehr_launch_token(patient)
    wider = smart.refresh(first["refresh_token"], scope="patient/*.cruds")
    assert wider.json()["error"] == "invalid_scope"
    assert smart.fhir(f"Patient/{patient}", first["access_token"]).status_code == 200
    assert smart.refresh(first["refresh_token"]).status_code == 200


# --- Media.content.url walking out of Binary/ -------------------------------------------------


@pytest.mark.parametrize(
    "url", ["Binary/../../fhir/Patient/{pid}", "Binary/%2e%2e/%2e%2e/fhir/Patient/{pid}"]
)
def test_a_traversing_image_url_fails_the_study_visibly(stack: Stack, url: str) -> None:
    patient, _ = _post(stack, _inline(_png16(), "image/png"))
    _, study = _post(
        stack, {"contentType": "image/png", "url": url.format(pid=patient)}, status="available"
    )
    task = wait_for(f"a failed Task for ImagingStudy/{study}", lambda: stack.task(study), 180)
    assert task["status"] == "failed"
    assert "not a Binary on this FHIR server" in task["statusReason"]["text"]


# --- the issuer allow-list ---------------------------------------------------------------------


def test_an_unlisted_issuer_gets_no_fetch_and_no_redirect(stack: Stack) -> None:
    for iss in (
        "http://127.0.0.1:9/fhir",
        f"http://127.0.0.1:{stack.settings.hapi_port}/fhir",  # reachable, but not an EHR we trust
        "https://launch.smarthealthit.org/v/r4/sim/x/fhir",
    ):
        r = httpx.get(
            f"{stack.settings.service_url}/app/launch", params={"iss": iss, "launch": "x"}
        )
        assert r.status_code == 400, r.text
        assert "location" not in r.headers


# --- duplicate notifications ------------------------------------------------------------------


def test_notifications_differing_in_version_do_not_multiply_jobs(stack: Stack) -> None:
    """100 notifications of one study that differ only in versionId, sent as a burst (as HAPI
    redelivers them): at most one job waits at a time, so most of them find one waiting and
    queue nothing (the exact rule is unit-tested in tests/subscriptions/test_queue_lock.py).
    The burst's versions are ones HAPI never sends, so its own Media notification (which CI
    saw land during the burst) is told apart."""
    _, study_id = _post(stack, _inline(_png16(), "image/png"))
    study = {**stack.fhir.read("ImagingStudy", study_id), "status": "available"}
    versions = range(1001, 1101)
    answers = stack.notify_burst(study, versions)
    assert all(r.status_code == 200 for r in answers)
    queued = [r for r in answers if "already queued" not in r.text]
    assert len(stack.burst_jobs(study_id, versions)) == len(queued)
    assert len(queued) <= 50, f"{len(queued)} jobs for 100 notifications"
    assert len([j for j in stack.jobs("todo") if j[2] == study_id]) <= 1
