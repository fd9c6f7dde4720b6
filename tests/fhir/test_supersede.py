"""Withdrawing a report whose image changed, and naming it from its successor."""

from __future__ import annotations

import pytest

from fhir_service.fhir.supersede import supersede, supersede_report
from models.types import ImageAnalysis
from tests.factories import (
    make_study,
    one_of,
    resources_of,
    result_bundle,
)
from tests.fhir.r4 import AIAST, Resource

# --- supersession ---------------------------------------------------------------------------


def _stored(bundle: Resource, kind: str, rid: str) -> Resource:
    res = dict(
        one_of(bundle, kind) if kind == "DiagnosticReport" else resources_of(bundle, kind)[0]
    )
    return {**res, "id": rid, "meta": {**res.get("meta", {}), "versionId": "1"}}


def test_supersede_statuses_follow_r4_withdrawal_codes(analysis: ImageAnalysis) -> None:
    old = result_bundle(analysis)
    report = _stored(old, "DiagnosticReport", "r1")
    withdrawn = supersede_report(report)
    assert withdrawn["status"] == "cancelled"
    assert withdrawn["meta"] == {"security": [AIAST]}
    assert withdrawn["conclusion"] == report["conclusion"]
    assert supersede(withdrawn) == withdrawn
    assert supersede(_stored(old, "Observation", "o1"))["status"] == "cancelled"
    assert supersede(_stored(old, "Media", "m1"))["status"] == "stopped"
    assert report["status"] == "preliminary"  # the input is not modified
    with pytest.raises(ValueError):
        supersede_report(_stored(old, "Observation", "o1"))
    with pytest.raises(ValueError):
        supersede({"resourceType": "Patient", "id": "p"})


def test_new_report_names_the_old_one_as_revised(analysis: ImageAnalysis) -> None:
    old = result_bundle(analysis)
    old_report = _stored(old, "DiagnosticReport", "r1")
    old_obs = _stored(old, "Observation", "o1")
    new = result_bundle(
        analysis,
        image_sha256="cd" * 32,
        study=make_study(version="4"),
        supersedes=[old_report, old_obs],
    )
    prov = one_of(new, "Provenance")
    assert prov["entity"][:2] == [
        {"role": "source", "what": {"reference": "ImagingStudy/cxr-1/_history/4"}},
        {"role": "revision", "what": {"reference": "DiagnosticReport/r1/_history/1"}},
    ]
    puts = [e for e in new["entry"] if e["request"]["method"] == "PUT"]
    assert [p["request"]["url"] for p in puts] == ["DiagnosticReport/r1", "Observation/o1"]
    assert [p["resource"]["status"] for p in puts] == ["cancelled", "cancelled"]
    assert all("versionId" not in p["resource"]["meta"] for p in puts)
    # Validators require a fullUrl on every entry; a placeholder keeps the bundle server-free.
    assert all(p["fullUrl"].startswith("urn:uuid:") for p in puts)
    new_report = next(
        r for r in resources_of(new, "DiagnosticReport") if r["status"] == "preliminary"
    )
    assert new_report["identifier"][0] != old_report["identifier"][0]
    # Same study and model: the sweep's (study, model) key is shared.
    assert new_report["identifier"][1] == old_report["identifier"][1]


def test_supersedes_by_reference_only_names_the_old_report(analysis: ImageAnalysis) -> None:
    new = result_bundle(analysis, image_sha256="cd" * 32, supersedes=["DiagnosticReport/r1"])
    assert all(e["request"]["method"] == "POST" for e in new["entry"])
    entities = one_of(new, "Provenance")["entity"]
    assert entities[1] == {"role": "revision", "what": {"reference": "DiagnosticReport/r1"}}
    with pytest.raises(ValueError, match="DiagnosticReport references"):
        result_bundle(analysis, image_sha256="cd" * 32, supersedes=["Observation/o1"])


def test_superseded_resources_need_an_id(analysis: ImageAnalysis) -> None:
    old_report = one_of(result_bundle(analysis), "DiagnosticReport")
    with pytest.raises(ValueError, match="id"):
        result_bundle(analysis, image_sha256="cd" * 32, supersedes=[old_report])


def test_results_of_an_entered_in_error_study_are_marked_in_one_transaction() -> None:
    from fhir_service.fhir.supersede import entered_in_error, entered_in_error_transaction

    meta = {"versionId": "2", "lastUpdated": "2025-01-01T00:00:00Z", "security": []}
    report = {"resourceType": "DiagnosticReport", "id": "r1", "status": "preliminary", "meta": meta}
    obs = {"resourceType": "Observation", "id": "o1", "status": "preliminary"}
    heatmap = {"resourceType": "Media", "id": "m1", "status": "completed"}
    done = {"resourceType": "Observation", "id": "o2", "status": "entered-in-error"}
    marked = entered_in_error(report)
    assert marked["status"] == "entered-in-error"
    assert marked["meta"] == {"security": []}
    assert report["status"] == "preliminary"
    bundle = entered_in_error_transaction("s1", [report, obs, heatmap, done])
    assert bundle["type"] == "transaction"
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "PUT", "url": "DiagnosticReport/r1"},
        {"method": "PUT", "url": "Observation/o1"},
        {"method": "PUT", "url": "Media/m1"},
    ]
    assert {e["resource"]["status"] for e in bundle["entry"]} == {"entered-in-error"}
    assert entered_in_error_transaction("s1", [done])["entry"] == []
    with pytest.raises(ValueError):
        entered_in_error({"resourceType": "Patient", "id": "p"})
