"""Losing a race to a concurrent ``cxr ingest``: HAPI's 409 is retried, the retry's matches are
reported as already present, and a study update never overwrites a newer version. A scripted
FHIR server (httpx.MockTransport) makes the race happen on every run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_service.fhir.client import FhirClient
from fhir_service.ingest import IngestOptions, commit, ingest, nih, transaction
from fhir_service.ingest.nih import BoundingBox

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
]
BOX = "00000001_001.png,Mass,10,20,30,40"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commit, "_backoff", lambda attempt: 0.0)


def _outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "diagnostics": text}],
    }


def _conflict() -> httpx.Response:
    return httpx.Response(409, json=_outcome("HAPI-0550: HAPI-2745: Error flushing transaction"))


def _matched(bundle: dict[str, Any]) -> httpx.Response:
    """What HAPI answers when every conditional create matched (another run's resources)."""
    entries = []
    for i, entry in enumerate(bundle["entry"]):
        kind = entry["resource"]["resourceType"]
        entries.append({"response": {"status": "200 OK", "location": f"{kind}/{i + 1}/_history/1"}})
    return httpx.Response(
        200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
    )


def _files(tmp_path: Path, *, box: bool = False) -> IngestOptions:
    metadata = tmp_path / "Data_Entry_2017_v2020.csv"
    metadata.write_text("\n".join([HEADER, *ROWS]) + "\n")
    bbox = tmp_path / "BBox_List_2017.csv"
    bbox.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + BOX + "\n")
    return IngestOptions(
        metadata=metadata, state_dir=tmp_path / "state", bbox=bbox if box else None
    )


def _client(handler: Handler) -> FhirClient:
    return FhirClient("http://fhir.test/fhir", transport=httpx.MockTransport(handler))


def test_a_lost_race_is_sent_again_and_reported_as_already_present(tmp_path: Path) -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/fhir/")
        sent.append(json.loads(request.content))
        return _conflict() if len(sent) < 3 else _matched(sent[-1])

    report = ingest(_client(handler), _files(tmp_path))
    # The same transaction, every entry still a conditional create: HAPI re-resolves them.
    assert len(sent) == 3 and sent[0] == sent[1] == sent[2]
    assert all(e["request"]["ifNoneExist"] for e in sent[0]["entry"])
    assert report.conflicts_retried == 2
    assert (report.rows_created, report.rows_already_present, report.failed) == (0, 2, [])
    assert report.created == {}
    assert report.already_present == {"ImagingStudy": 2, "Patient": 1}


def test_a_race_lost_every_time_fails_the_rows_visibly(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return _conflict()

    report = ingest(_client(handler), _files(tmp_path))
    # batch, then row by row, each with all its retries; nothing committed, nothing hidden
    per_try = commit.CONFLICT_RETRIES + 1
    assert len(calls) == 3 * per_try
    assert [b.line for b in report.failed] == [2, 3]
    assert "409" in report.failed[0].reason
    assert report.rows_created == report.rows_already_present == 0


def test_box_update_rereads_after_a_concurrent_version(tmp_path: Path) -> None:
    """A matched study lacks its box; the If-Match update loses to a concurrent run that
    added the box: the study is read again, found complete, and left alone."""
    box = BoundingBox("00000001_001.png", "Mass", 10.0, 20.0, 30.0, 40.0)
    rec = nih.NihRecord("00000001_001.png", "1", 1, 58, "male", "PA", ())
    bare = {**transaction.imaging_study_resource(rec, "Patient/1", status="registered"), "id": "2"}
    versions = [
        {**bare, "meta": {"versionId": "1"}},
        {**transaction.with_boxes(bare, [box]), "meta": {"versionId": "2"}},
    ]
    log: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        log.append(f"{request.method} {request.headers.get('If-Match', '')}".strip())
        if request.method == "POST":
            return _matched(json.loads(request.content))
        if request.method == "GET":
            return httpx.Response(200, json=versions[0] if len(log) < 4 else versions[1])
        assert request.method == "PUT"
        return _conflict()

    report = ingest(_client(handler), _files(tmp_path, box=True))
    assert log == ["POST", "GET", 'PUT W/"1"', "GET"]
    assert report.conflicts_retried == 1
    assert (report.boxes_written, report.boxes_already_present) == (0, 1)
    assert report.studies_boxes_updated == 0 and report.failed == []
