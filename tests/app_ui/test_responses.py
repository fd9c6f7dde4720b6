"""What the app answers a browser: images only as PNGs our decoder wrote (never the stored
bytes, whatever contentType a Media declares), ``nosniff`` on everything, a strict CSP on
the pages and a sandboxing one on the rest, a Lax cookie, a CSRF-checked logout, and
thumbnails that never fail.

In process (FastAPI's TestClient, with the service's own ``SecurityHeaders`` middleware);
the EHR's FHIR base is an ``httpx.MockTransport`` holding one study's Media.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from fhir_service.api.headers import SecurityHeaders
from fhir_service.app_ui import routes, smart
from fhir_service.app_ui.images import placeholder_png
from fhir_service.app_ui.service import AppUi
from fhir_service.app_ui.session import COOKIE, AppSession, Tokens
from fhir_service.fhir.terminology import TERMINOLOGY
from fhir_service.settings import Settings

ISS = "http://ehr.test/fhir"
T0 = 1_750_000_000.0
HEATMAP_SYSTEM = TERMINOLOGY.identifier_system("heatmap")
XSS = b"<html><body><script>fetch('/app/api/context').then(r=>r.text()).then(alert)</script>"


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _gradient(mode: str = "L") -> Image.Image:
    arr = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    return Image.fromarray(arr).convert(mode)


def sixteen_bit_png() -> bytes:
    arr = (np.tile(np.arange(64, dtype=np.uint16), (64, 1)) * 1000).astype(np.uint16)
    return _encode(Image.fromarray(arr), "PNG")


#: Images that decode (each once made the old thumbnail code fail or pass through) ...
DECODABLE = {
    "grey-png": lambda: _encode(_gradient("L"), "PNG"),
    "rgba-png": lambda: _encode(_gradient("RGBA"), "PNG"),
    "la-png": lambda: _encode(_gradient("LA"), "PNG"),
    "palette-png": lambda: _encode(_gradient("P"), "PNG"),
    "bilevel-png": lambda: _encode(_gradient("1"), "PNG"),
    "16-bit-png": sixteen_bit_png,
    "cmyk-jpeg": lambda: _encode(_gradient("CMYK"), "JPEG"),
    "rgb-jpeg": lambda: _encode(_gradient("RGB"), "JPEG"),
    "gif": lambda: _encode(_gradient("P"), "GIF"),
}
#: ... and bytes that do not.
UNDECODABLE = {
    "html": lambda: XSS,
    "svg": lambda: b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
    "truncated-png": lambda: _encode(_gradient("L"), "PNG")[:80],
    "float-tiff": lambda: _encode(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"),
    "empty": lambda: b"",
    "zeros": lambda: b"\x00" * 4096,
}


class Ehr:
    """One study ``s1`` of Patient ``p1`` with an input Media whose bytes and declared
    contentType each test sets, and (optionally) a stored heatmap overlay."""

    def __init__(self) -> None:
        self.data = b""
        self.content_type = "image/png"
        self.overlay: bytes | None = None

    def media(self) -> list[dict[str, Any]]:
        subject = {"reference": "Patient/p1"}
        found: list[dict[str, Any]] = [
            {
                "resourceType": "Media",
                "id": "m1",
                "status": "completed",
                "partOf": [{"reference": "ImagingStudy/s1"}],
                "subject": subject,
                "content": {
                    "contentType": self.content_type,
                    "data": base64.b64encode(self.data).decode(),
                },
            }
        ]
        if self.overlay is not None:
            found.append(
                {
                    "resourceType": "Media",
                    "id": "h1",
                    "status": "completed",
                    "identifier": [{"system": HEATMAP_SYSTEM, "value": "s1-Effusion"}],
                    "partOf": [{"reference": "ImagingStudy/s1"}],
                    "subject": subject,
                    "reasonCode": [
                        {
                            "coding": [
                                {
                                    "system": TERMINOLOGY.code_system_url("nih_label"),
                                    "code": "Effusion",
                                }
                            ]
                        }
                    ],
                    "content": {
                        "contentType": "image/png",
                        "data": base64.b64encode(self.overlay).decode(),
                    },
                }
            )
        return found

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/fhir/Patient/p1":
            return httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})
        assert request.url.path == "/fhir/Media"
        entries = [{"resource": m} for m in self.media()]
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})


class App:
    def __init__(self, tmp_path: Path) -> None:
        self.ehr = Ehr()
        settings = Settings(
            data_dir=tmp_path,
            model_weights="untrained",
            clip_weights="untrained",
            app_heatmap_on_demand=False,
        )
        self.ui = AppUi(settings, transport=httpx.MockTransport(self.ehr), clock=lambda: T0)
        app = FastAPI()
        app.add_middleware(SecurityHeaders)
        app.include_router(routes.router)
        app.state.app_ui = self.ui
        self.client = TestClient(app, follow_redirects=False)
        self.session = self.sign_in()

    def sign_in(self) -> AppSession:
        session = self.ui.sessions.new()
        session.iss = ISS
        session.token_endpoint = "http://ehr.test/auth/token"
        session.mode = "patient"
        session.tokens = Tokens(
            access_token="at-1", expires_at=T0 + 3600, scope=smart.RESOURCE_SCOPES, patient="p1"
        )
        self.client.cookies.set(COOKIE, self.ui.sessions.cookie_value(session))
        return session

    def image(self, data: bytes, content_type: str = "image/png", **params: Any) -> Any:
        self.ehr.data, self.ehr.content_type = data, content_type
        self.session.extra.clear()
        return self.client.get("/app/api/image/s1", params=params)


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App(tmp_path)


def _png_mode(body: bytes) -> str:
    with Image.open(io.BytesIO(body)) as img:
        assert img.format == "PNG"
        return str(img.mode)


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", ["text/html", "image/svg+xml", "application/xhtml+xml"])
def test_a_media_declaring_html_is_never_served_as_such(app: App, declared: str) -> None:
    resp = app.image(XSS, declared)
    assert resp.status_code == 422
    assert resp.headers["content-type"].startswith("application/json")
    assert XSS not in resp.content
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in resp.headers["content-security-policy"]


def test_a_real_image_under_a_false_content_type_is_reencoded(app: App) -> None:
    stored = DECODABLE["rgb-jpeg"]()
    resp = app.image(stored, "text/html")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    assert resp.content != stored
    assert _png_mode(resp.content) == "L"


def test_nothing_but_pixels_is_passed_on(app: App) -> None:
    """A PNG carrying a script in a text chunk comes back as pixels only."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", XSS.decode())
    stored = _encode(_gradient("L"), "PNG", pnginfo=info)
    assert b"<script>" in stored
    resp = app.image(stored, "image/png")
    assert resp.status_code == 200
    assert b"<script>" not in resp.content
    with Image.open(io.BytesIO(resp.content)) as ours, Image.open(io.BytesIO(stored)) as theirs:
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("kind", sorted(DECODABLE))
def test_every_decodable_image_is_shown_as_our_png(app: App, kind: str) -> None:
    stored = DECODABLE[kind]()
    full = app.image(stored)
    assert full.status_code == 200, full.text
    assert full.headers["content-type"] == "image/png"
    assert _png_mode(full.content) == "L"
    thumb = app.image(stored, size=32)
    assert thumb.status_code == 200 and thumb.headers["x-cxr-image"] == "image"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert max(img.size) <= 32


@pytest.mark.parametrize("kind", sorted(UNDECODABLE))
def test_an_undecodable_image_is_a_clear_error_and_its_thumbnail_a_placeholder(
    app: App, kind: str
) -> None:
    stored = UNDECODABLE[kind]()
    full = app.image(stored, "image/png")
    assert full.status_code in (404, 413, 422), full.text
    assert full.headers["content-type"].startswith("application/json")
    thumb = app.image(stored, "image/png", size=96)
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == "image/png"
    assert thumb.headers["x-cxr-image"] == "placeholder"
    assert thumb.content == placeholder_png(96)


def test_a_stored_overlay_is_reencoded_and_html_in_its_place_refused(app: App) -> None:
    app.ehr.data = DECODABLE["grey-png"]()
    overlay = _encode(_gradient("RGBA"), "PNG", compress_level=0)
    app.ehr.overlay = overlay
    resp = app.client.get("/app/api/heatmap/s1/Effusion")
    assert resp.status_code == 200
    assert resp.headers["x-cxr-heatmap"] == "stored"
    assert resp.content != overlay and _png_mode(resp.content) == "RGBA"
    app.ehr.overlay = XSS
    resp = app.client.get("/app/api/heatmap/s1/Effusion")
    assert resp.status_code == 422
    assert XSS not in resp.content


# --- headers, cookie, CSRF ----------------------------------------------------------------------


def test_pages_carry_a_strict_csp_and_nosniff(app: App) -> None:
    for path in ("/app/", "/app/study/s1"):
        resp = app.client.get(path)
        csp = resp.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'"
        assert directives["object-src"] == "'none'"
        assert directives["base-uri"] == "'none'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in csp and "*" not in csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"


def test_frame_ancestors_name_the_configured_ehr_origins() -> None:
    assert "frame-ancestors https://ehr.example" in routes.page_csp(["https://ehr.example"])


def test_every_app_answer_is_nosniff_and_api_answers_are_sandboxed(app: App) -> None:
    app.ehr.data = DECODABLE["grey-png"]()
    for path in ("/app/static/app.js", "/app/api/context", "/app/api/image/s1", "/app/nope"):
        resp = app.client.get(path)
        assert resp.headers["x-content-type-options"] == "nosniff", path
    api = app.client.get("/app/api/image/s1")
    assert api.headers["content-security-policy"].startswith("default-src 'none'")
    assert api.headers["cross-origin-resource-policy"] == "same-origin"


def test_the_session_cookie_is_http_only_and_lax(app: App) -> None:
    app.ui.issuer_allowed = lambda iss: True  # type: ignore[method-assign]
    app.ui.http = httpx.AsyncClient(
        transport=httpx.MockTransport(
            lambda r: httpx.Response(
                200,
                json={
                    "authorization_endpoint": "http://ehr.test/auth/authorize",
                    "token_endpoint": "http://ehr.test/auth/token",
                    "code_challenge_methods_supported": ["S256"],
                },
            )
        )
    )
    resp = app.client.get("/app/launch", params={"iss": ISS, "launch": "x"})
    cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/app" in cookie


def test_logout_needs_the_csrf_token(app: App) -> None:
    csrf = app.client.get("/app/api/context").json()["csrf"]
    assert csrf == app.session.csrf
    assert app.client.post("/app/logout").status_code == 403
    wrong = {routes.CSRF_HEADER: csrf + "x"}
    assert app.client.post("/app/logout", headers=wrong).status_code == 403
    cross = {routes.CSRF_HEADER: csrf, "Origin": "http://evil.test"}
    assert app.client.post("/app/logout", headers=cross).status_code == 403
    site = {routes.CSRF_HEADER: csrf, "Sec-Fetch-Site": "cross-site"}
    assert app.client.post("/app/logout", headers=site).status_code == 403
    assert app.ui.sessions.from_cookie(app.client.cookies.get(COOKIE)) is app.session
    ok = {routes.CSRF_HEADER: csrf, "Origin": app.ui.settings.service_url}
    assert app.client.post("/app/logout", headers=ok).status_code == 204
    assert app.ui.sessions.from_cookie(app.ui.sessions.cookie_value(app.session)) is None
