"""SSRF: the worker fetches ``Media.content.url`` only from this FHIR server's ``Binary`` or
an allow-listed image host, by exact host name; the app fetches ``{iss}/.well-known/…`` only
for listed issuers. Every other form — IPv6, decimal and hex IPs, user information,
``localhost.``, redirects — is refused without a request reaching its target, which a real
recording HTTP server on 127.0.0.1 checks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cxr_errors import ImageError
from fhir_service.app_ui import routes
from fhir_service.app_ui.service import AppUi
from fhir_service.fhir.client import FhirClient
from fhir_service.settings import Settings
from subscriptions.pixels import fetch_pixels


class Recorder:
    """An HTTP server that records every request; ``redirect_to`` makes it answer 302."""

    def __init__(self, redirect_to: str | None = None) -> None:
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.paths.append(self.path)
                if redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                body = b"\x89PNG\r\n\x1a\n"
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


def _fhir_with_media(url: str) -> FhirClient:
    def hapi(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/fhir/Media", "only the Media search goes to HAPI"
        media = {
            "resourceType": "Media",
            "id": "m1",
            "status": "completed",
            "partOf": [{"reference": "ImagingStudy/s1"}],
            "content": {"url": url, "contentType": "image/png"},
        }
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": [{"resource": media}]})

    return FhirClient("http://127.0.0.1:1/fhir", transport=httpx.MockTransport(hapi))


def _fetch(url: str, allowed: set[str]) -> None:
    fetch_pixels(
        _fhir_with_media(url), {"id": "s1"}, max_bytes=1024, allowed_hosts=frozenset(allowed)
    )


@pytest.mark.parametrize(
    ("form", "allowed"),
    [
        ("http://[::1]:{port}/x.png", {"images.example", "127.0.0.1"}),
        ("http://[::ffff:127.0.0.1]:{port}/x.png", {"127.0.0.1"}),
        ("http://2130706433:{port}/x.png", {"127.0.0.1"}),
        ("http://0x7f000001:{port}/x.png", {"127.0.0.1"}),
        ("http://127.1:{port}/x.png", {"127.0.0.1"}),
        ("http://017700000001:{port}/x.png", {"127.0.0.1"}),
        ("http://images.example@127.0.0.1:{port}/x.png", {"images.example"}),
        ("http://user:pw@127.0.0.1:{port}/x.png", {"127.0.0.1"}),
        ("http://localhost.:{port}/x.png", {"localhost"}),
        ("http://LOCALHOST:{port}/x.png", {"images.example"}),
        ("ftp://127.0.0.1:{port}/x.png", {"127.0.0.1"}),
        ("file:///etc/passwd", {"127.0.0.1", ""}),
        ("gopher://127.0.0.1:{port}/x", {"127.0.0.1"}),
        ("//127.0.0.1:{port}/x.png", {"127.0.0.1"}),
    ],
)
def test_no_disguised_host_is_fetched(target: Recorder, form: str, allowed: set[str]) -> None:
    with pytest.raises(ImageError):
        _fetch(form.format(port=target.port), allowed)
    assert target.paths == []


def test_a_redirect_from_an_allowed_host_is_not_followed(target: Recorder) -> None:
    bouncer = Recorder(redirect_to=f"http://localhost:{target.port}/secret")
    try:
        with pytest.raises(ImageError, match="answered 302"):
            _fetch(f"http://127.0.0.1:{bouncer.port}/x.png", {"127.0.0.1"})
        assert bouncer.paths == ["/x.png"]
        assert target.paths == []
    finally:
        bouncer.close()


def test_an_allowed_host_is_fetched(target: Recorder) -> None:
    """The control: the same server, named as listed, is reached."""
    _fetch(f"http://127.0.0.1:{target.port}/x.png", {"127.0.0.1"})
    assert target.paths == ["/x.png"]


@pytest.mark.parametrize(
    "form",
    [
        "http://[::1]:{port}/fhir",
        "http://2130706433:{port}/fhir",
        "http://127.0.0.1:{port}@localhost:{port}/fhir",
        "http://localhost.:{port}/fhir",
        "http://127.0.0.1:{port}/fhir/../other",
        "http://127.0.0.1:{port}/fhir/%2e%2e/other",
        "http://127.0.0.1:{port}/fhir?x=1",
    ],
)
def test_the_app_fetches_no_disguised_issuer(tmp_path: Path, target: Recorder, form: str) -> None:
    listed = f"http://localhost:{target.port}/fhir"
    ui = AppUi(Settings(data_dir=tmp_path, app_issuers=[listed]))
    app = FastAPI()
    app.include_router(routes.router)
    app.state.app_ui = ui
    client = TestClient(app, follow_redirects=False)
    resp = client.get("/app/launch", params={"iss": form.format(port=target.port), "launch": "x"})
    assert resp.status_code == 400
    assert "location" not in resp.headers
    assert target.paths == []
