"""``$analyze`` (``fhir_service.analyze``): an uploaded image read by the real (untrained)
classifier, answered as an unsaved ``collection`` Bundle; what it refuses and why."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cxr_errors import ForbiddenError, InputError, NotARadiographError
from fhir_service.analyze import AdhocAnalysis, AnalyzeRequest, parse_analyze
from fhir_service.fhir.adhoc import NOT_SAVED
from fhir_service.fhir.inbound import check_resource
from fhir_service.fhir.terminology import TERMINOLOGY
from fhir_service.runtime import LazyModels
from fhir_service.settings import Settings


@pytest.fixture(scope="module")
def analysis(test_settings: Settings) -> AdhocAnalysis:
    return AdhocAnalysis(LazyModels(test_settings.model_copy(update={"model_backend": "torch"})))


@pytest.fixture(scope="module")
def png(shared_dir: Path) -> bytes:
    return (shared_dir / "data" / "nih-sample" / "00000001_000.png").read_bytes()


def _parameters(data: bytes, content_type: str = "image/png", **extra: str) -> dict[str, Any]:
    image = {"contentType": content_type, "data": base64.b64encode(data).decode()}
    params: list[dict[str, Any]] = [{"name": "image", "valueAttachment": image}]
    params += [{"name": k, "valueString": v} for k, v in extra.items()]
    return {"resourceType": "Parameters", "parameter": params}


def test_an_image_gives_an_unsaved_collection_of_the_pipelines_resources(
    analysis: AdhocAnalysis, png: bytes
) -> None:
    bundle = analysis.run(parse_analyze(_parameters(png, patient="Patient/p7")))
    check_resource(bundle, "Bundle")
    assert bundle["type"] == "collection"
    not_saved = TERMINOLOGY.concept("not_saved")
    assert bundle["meta"]["tag"] == [not_saved]
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Observation") == 14
    assert {"Device", "DocumentReference", "DiagnosticReport"} <= set(kinds)
    assert "Provenance" not in kinds  # nothing was recorded
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert not_saved in resource["meta"]["tag"]
        assert "request" not in entry
        for link in ("derivedFrom", "partOf", "imagingStudy"):
            assert link not in resource  # there is no study
        if resource["resourceType"] in ("Observation", "DiagnosticReport", "Media"):
            assert resource["subject"] == {"reference": "Patient/p7"}
    (report,) = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    assert report["conclusion"].startswith(NOT_SAVED)
    assert "UNTRAINED" in report["conclusion"]
    assert "ImagingStudy/" not in json.dumps(bundle)


def test_without_a_patient_nothing_has_a_subject(analysis: AdhocAnalysis, png: bytes) -> None:
    bundle = analysis.run(parse_analyze(_parameters(png)))
    about = [e["resource"] for e in bundle["entry"]]
    assert all("Patient/" not in json.dumps(r.get("subject", {})) for r in about)


def test_a_patient_token_analyses_for_its_own_patient_only(
    analysis: AdhocAnalysis, png: bytes
) -> None:
    with pytest.raises(ForbiddenError, match="Patient/p1 only"):
        analysis.run(AnalyzeRequest(png, patient="p2"), bound_patient="p1")
    bundle = analysis.run(AnalyzeRequest(png), bound_patient="p1")
    report = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert report["subject"] == {"reference": "Patient/p1"}


def _png_of(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_the_input_gate_and_limits_of_the_pipeline_apply(analysis: AdhocAnalysis) -> None:
    black = _png_of(np.zeros((512, 512), np.uint8))
    with pytest.raises(NotARadiographError, match="near-constant"):
        analysis.run(parse_analyze(_parameters(black)))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"resourceType": "Parameters", "parameter": []}, "needs an 'image' parameter"),
        (_parameters(b"%PDF-1.4", "application/pdf"), "contentType"),
        (_parameters(b"x", count="3"), "unknown parameter"),
        (_parameters(b"x", patient="../Patient/1"), "patient must be"),
        ({"resourceType": "Bundle"}, "Parameters resource"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_analyze(body)
