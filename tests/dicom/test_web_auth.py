"""The credentials DicomwebPacs sends, seen by a local HTTP server (a fake PACS: Orthanc has no
bearer tokens; basic auth against the real one is in tests/integration/test_pacs_auth.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import pytest

from cxr_errors import PacsError
from fhir_service.dicom.web import DicomwebAuth, DicomwebPacs
from tests.local_http import QuietHandler, serving

TOKEN = "pacs-token-123"


class _Pacs(QuietHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        self.seen.append(auth)
        status = 200 if auth == f"Bearer {TOKEN}" else 401
        body = b"[]" if status == 200 else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def base() -> Iterator[str]:
    _Pacs.seen = []
    with serving(_Pacs) as url:
        yield f"{url}/dicom-web"


def test_a_bearer_token_goes_in_the_authorization_header(base: str) -> None:
    pacs = DicomwebPacs(base, DicomwebAuth(token=TOKEN), timeout_s=5)
    assert pacs.study_uids(PatientID="P1") == []
    assert _Pacs.seen == [f"Bearer {TOKEN}"]


def test_a_refused_token_names_the_settings_to_check(base: str) -> None:
    pacs = DicomwebPacs(base, DicomwebAuth(token="stale"), timeout_s=5)
    with pytest.raises(PacsError, match=r"refused QIDO-RS \(401\).*CXR_DICOMWEB_TOKEN"):
        pacs.study_uids(PatientID="P1")
