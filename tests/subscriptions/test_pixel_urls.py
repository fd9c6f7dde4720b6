"""``Media.content.url`` on the FHIR server: only ``Binary/{id}``, after normalisation.

The worker reads what the URL names with its own access to the FHIR server, so a URL that
claims to be a Binary but walks elsewhere (``Binary/../../fhir/Patient/1``, encoded or not)
must be refused, not fetched (issue 13's probe read a Patient this way).
"""

from __future__ import annotations

import httpx
import pytest

from cxr_errors import ImageError
from fhir_service.fhir.client import FhirClient
from subscriptions.pixels import fetch_pixels, same_server_binary

BASE = "http://127.0.0.1:8080/fhir"


@pytest.mark.parametrize(
    ("url", "binary"),
    [
        ("Binary/abc", "Binary/abc"),
        (f"{BASE}/Binary/abc-1.2", "Binary/abc-1.2"),
        ("HTTP://127.0.0.1:8080/fhir/Binary/x", "Binary/x"),
        ("http://127.0.0.1:8080/fhir/Binary/%61bc", "Binary/abc"),
    ],
)
def test_binaries_on_this_server_are_read(url: str, binary: str) -> None:
    assert same_server_binary(BASE, url, "Media/1") == binary


@pytest.mark.parametrize(
    "url",
    [
        "Binary/../../fhir/Patient/1",
        "Binary/../Patient/1",
        "Binary/..",
        "Binary/.",
        "Binary/%2e%2e/%2e%2e/fhir/Patient/1",
        "Binary/%2E%2E%2FPatient%2F1",
        "Binary/%252e%252e/Patient/1",
        "Binary/%25252e%25252e/Patient/1",
        "Binary/..%2fPatient%2f1",
        "Binary\\..\\Patient\\1",
        "Binary/1/../../Patient/1",
        "Binary/1?_format=json",
        "Binary/1#x",
        "Binary/ 1",
        "Binary/1%00",
        f"{BASE}/Binary/../Patient/1",
        f"{BASE}/Binary/%2e%2e/Patient/1",
        f"{BASE}/Patient/1",
        f"{BASE}/./Binary/1",
        "Patient/1",
        "/fhir/Binary/1",
        "",
    ],
)
def test_anything_else_claiming_this_server_is_refused(url: str) -> None:
    with pytest.raises(ImageError):
        same_server_binary(BASE, url, "Media/1")


@pytest.mark.parametrize(
    "url",
    [
        "http://images.example/x.png",
        "http://127.0.0.1:8081/fhir/Binary/1",  # another port is another server
        "https://127.0.0.1:8080/fhir/Binary/1",
        "http://user@127.0.0.1:8080/fhir/Binary/1",
    ],
)
def test_other_servers_are_not_this_one(url: str) -> None:
    assert same_server_binary(BASE, url, "Media/1") is None


def test_a_traversing_url_is_never_requested() -> None:
    requested: list[str] = []

    def hapi(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        if request.url.path == "/fhir/Media":
            media = {
                "resourceType": "Media",
                "id": "m1",
                "status": "completed",
                "partOf": [{"reference": "ImagingStudy/s1"}],
                "content": {"url": "Binary/%2e%2e/%2e%2e/fhir/Patient/1"},
            }
            return httpx.Response(
                200, json={"resourceType": "Bundle", "entry": [{"resource": media}]}
            )
        return httpx.Response(200, json={"resourceType": "Patient", "id": "1"})

    fhir = FhirClient(BASE, transport=httpx.MockTransport(hapi))
    with pytest.raises(ImageError, match="not a Binary on this FHIR server"):
        fetch_pixels(fhir, {"id": "s1"}, max_bytes=1024)
    assert [u for u in requested if "/Media" not in u] == []
