"""The app's three calls that carry an image (upload, ad-hoc analysis, search by image) refuse
what they cannot use before anything reaches the EHR or the model: no CSRF token, a body that
is not the JSON they take, an image that is not base64, a type the pipeline does not read, an
image over the pipeline's size limit, and (upload) a launch without the write scopes."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from fhir_service.app_ui.routes import CSRF_HEADER
from tests.app_ui.test_responses import App

CALLS = ["/app/api/upload", "/app/api/analyze", "/app/api/similar-image"]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App(tmp_path)


def _post(app: App, path: str, body: Any, *, csrf: bool = True) -> Any:
    headers = {CSRF_HEADER: app.session.csrf} if csrf else {}
    if isinstance(body, bytes):
        return app.client.post(path, content=body, headers=headers)
    return app.client.post(path, json=body, headers=headers)


def _may_upload(app: App) -> None:
    assert app.session.tokens is not None
    app.session.tokens.scope += " patient/ImagingStudy.c patient/Media.c"


@pytest.mark.parametrize("path", CALLS)
def test_without_the_csrf_token_it_is_403(app: App, path: str) -> None:
    resp = _post(app, path, {"image": PNG, "content_type": "image/png"}, csrf=False)
    assert resp.status_code == 403
    assert "CSRF" in resp.json()["error"]


@pytest.mark.parametrize("path", CALLS)
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "is not JSON"),
        ([1, 2], "valid dictionary"),
        ({"content_type": "image/png"}, "image"),
        ({"image": "***", "content_type": "image/png"}, "not valid base64"),
        ({"image": PNG, "content_type": "text/html"}, "is not a PNG, JPEG or DICOM image"),
    ],
    ids=["not-json", "not-an-object", "no-image", "not-base64", "html"],
)
def test_a_malformed_call_is_400_with_the_reason(app: App, path: str, body: Any, says: str) -> None:
    _may_upload(app)
    resp = _post(app, path, body)
    assert resp.status_code == 400, resp.text
    assert says in resp.json()["error"]


@pytest.mark.parametrize("path", CALLS)
def test_an_image_over_the_limit_is_413(app: App, path: str) -> None:
    _may_upload(app)
    app.ui.settings = app.ui.settings.model_copy(update={"max_image_bytes": 16})
    resp = _post(app, path, {"image": PNG, "content_type": "image/png"})
    assert resp.status_code == 413
    assert "more than the 16 allowed" in resp.json()["error"]


def test_an_upload_without_the_write_scopes_is_403_and_says_which(app: App) -> None:
    resp = _post(app, "/app/api/upload", {"image": PNG, "content_type": "image/png"})
    assert resp.status_code == 403
    assert "patient/ImagingStudy.c and patient/Media.c" in resp.json()["error"]
