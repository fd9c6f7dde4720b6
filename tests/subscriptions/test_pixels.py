"""Where a study's pixels may come from: the same-server rule and the image-host allow-list
(SSRF), inline data and size limits, checked against a fake FHIR server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cxr_errors import ImageError, ImageTooLargeError
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.inbound import MalformedResource
from subscriptions.pixels import fetch_pixels
from tests.local_http import QuietHandler, serving

BASE = "http://fhir.test/fhir"
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10
STUDY = {"resourceType": "ImagingStudy", "id": "s1", "status": "available"}


def _media(content: dict[str, Any], mid: str = "m1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Media",
        "id": mid,
        "status": "completed",
        "partOf": [{"reference": "ImagingStudy/s1"}],
        "content": content,
        "meta": {"lastUpdated": "2026-01-01T00:00:00Z"},
        **extra,
    }


def _fhir(media: list[dict[str, Any]], binaries: dict[str, bytes] | None = None) -> FhirClient:
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        path = request.url.path.removeprefix("/fhir/")
        if path == "Media":
            entries = [{"resource": m, "search": {"mode": "match"}} for m in media]
            return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})
        if path.startswith("Binary/") and binaries and path in binaries:
            return httpx.Response(
                200, content=binaries[path], headers={"content-type": "image/png"}
            )
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})

    client = FhirClient(BASE, transport=httpx.MockTransport(handler))
    client.requested = requested  # type: ignore[attr-defined]
    return client


def test_inline_pixels_are_decoded() -> None:
    fhir = _fhir([_media({"contentType": "image/png", "data": base64.b64encode(PNG).decode()})])
    pixels = fetch_pixels(fhir, STUDY, max_bytes=1 << 20)
    assert pixels.data == PNG and pixels.source == "Media/m1"


def test_a_binary_on_the_same_server_is_fetched() -> None:
    for url in ("Binary/b1", f"{BASE}/Binary/b1"):
        fhir = _fhir([_media({"contentType": "image/png", "url": url})], {"Binary/b1": PNG})
        assert fetch_pixels(fhir, STUDY, max_bytes=1 << 20).data == PNG


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.test/x.png",
        "http://169.254.169.254/latest/meta-data",
        f"{BASE}/Patient/1",
        "Patient/1",
        "file:///etc/passwd",
    ],
)
def test_urls_off_the_server_and_the_allow_list_are_refused(url: str) -> None:
    fhir = _fhir([_media({"contentType": "image/png", "url": url})])
    with pytest.raises(ImageError):
        fetch_pixels(fhir, STUDY, max_bytes=1 << 20)
    assert all("evil" not in u and "169.254" not in u for u in fhir.requested)  # type: ignore[attr-defined]


@pytest.fixture
def image_host() -> Iterator[str]:
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)

    with serving(Handler) as url:
        yield url


def test_an_allow_listed_image_host_is_fetched(image_host: str) -> None:
    fhir = _fhir([_media({"contentType": "image/png", "url": f"{image_host}/a.png"})])
    pixels = fetch_pixels(fhir, STUDY, max_bytes=1 << 20, allowed_hosts=frozenset({"127.0.0.1"}))
    assert pixels.data == PNG
    with pytest.raises(ImageError, match="allow-listed"):
        fetch_pixels(fhir, STUDY, max_bytes=1 << 20, allowed_hosts=frozenset({"localhost"}))


def test_sizes_are_checked_before_decoding() -> None:
    big = base64.b64encode(b"x" * 4096).decode()
    fhir = _fhir([_media({"contentType": "image/png", "data": big})])
    with pytest.raises(ImageTooLargeError, match="inline"):
        fetch_pixels(fhir, STUDY, max_bytes=1024)
    declared = _fhir([_media({"contentType": "image/png", "url": "Binary/b1", "size": 10**9})])
    with pytest.raises(ImageTooLargeError, match="declares"):
        fetch_pixels(declared, STUDY, max_bytes=1024)


def test_our_own_heatmaps_are_not_input() -> None:
    overlay = _media(
        {"contentType": "image/png", "data": base64.b64encode(PNG).decode()},
        mid="h1",
        identifier=[{"system": "https://cxr-fhir.example.org/fhir/NamingSystem/cxr-heatmap"}],
    )
    with pytest.raises(ImageError, match="no pixels"):
        fetch_pixels(_fhir([overlay]), STUDY, max_bytes=1 << 20)


def test_a_malformed_media_is_refused_naming_the_field() -> None:
    bad = _media({"contentType": 12, "data": base64.b64encode(PNG).decode()})
    with pytest.raises(MalformedResource, match=r"content\.contentType"):
        fetch_pixels(_fhir([bad]), STUDY, max_bytes=1 << 20)


def test_bad_base64_is_an_image_error() -> None:
    fhir = _fhir([_media({"contentType": "image/png", "data": "not base64!"})])
    with pytest.raises(ImageError, match="base64"):
        fetch_pixels(fhir, STUDY, max_bytes=1 << 20)
