"""Inbound resources are checked against fhir.resources' R4B models, and every resource our
builders write passes the same models."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_service.fhir.inbound import MalformedResource, check_resource, validation_problems
from fhir_service.fhir.outcome import operation_outcome
from fhir_service.fhir.results import build_result_transaction
from fhir_service.fhir.supersede import entered_in_error, supersede
from fhir_service.fhir.tasks import (
    build_cancelled_task,
    build_completed_task,
    build_failed_task,
    build_waiting_task,
)
from fhir_service.fhir.terminology import local_code_systems
from fhir_service.ingest.nih import BoundingBox, NihRecord
from fhir_service.ingest.rows import Row
from fhir_service.ingest.transaction import build_transaction, study_bundle
from subscriptions.bootstrap import MEDIA_CRITERIA, MEDIA_SUBSCRIPTION_ID, desired_subscription
from tests.factories import (
    IMAGE_SHA256,
    RECORDED,
    make_analysis,
    make_heatmaps,
    make_png,
    make_study,
)

REC = NihRecord("00000001_000.png", "1", 0, 0, "male", "PA", ("Effusion",))


def _valid(resource: dict[str, Any]) -> None:
    assert validation_problems(resource) == [], resource.get("resourceType")


def test_check_resource_returns_the_dict_and_names_bad_fields() -> None:
    study = make_study()
    assert check_resource(study, "ImagingStudy") == study
    with pytest.raises(MalformedResource) as raised:
        check_resource({**study, "numberOfSeries": "two"}, "ImagingStudy", what="ImagingStudy/x")
    assert raised.value.message.startswith("ImagingStudy/x is not a valid FHIR ImagingStudy")
    assert "numberOfSeries" in raised.value.message


def test_lists_and_nesting_are_named_with_indexes() -> None:
    study = {**make_study(), "series": [{"uid": "1.2", "modality": {"code": 5}}]}
    problems = validation_problems(study)
    assert any(p.startswith("series[0].modality.code") for p in problems), problems


@pytest.mark.parametrize("kind", ["Basic", "Binary", "Nope"])
def test_unknown_or_unexpected_types(kind: str) -> None:
    with pytest.raises(MalformedResource):
        check_resource({"resourceType": kind}, ("ImagingStudy", "Media"))


@pytest.mark.parametrize("untrained", [False, True])
def test_every_resource_of_a_result_transaction_is_valid_r4(untrained: bool) -> None:
    analysis = make_analysis(untrained=untrained)
    old_report = {
        "resourceType": "DiagnosticReport",
        "id": "r0",
        "meta": {"versionId": "1"},
        "status": "preliminary",
        "code": {"text": "x"},
    }
    bundle = build_result_transaction(
        make_study(),
        analysis,
        make_heatmaps(analysis),
        image_sha256=IMAGE_SHA256,
        recorded=RECORDED,
        supersedes=[old_report],
    )
    _valid(bundle)
    kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert kinds == {
        "Device",
        "DocumentReference",
        "Observation",
        "Media",
        "DiagnosticReport",
        "Provenance",
    }
    for entry in bundle["entry"]:
        _valid(entry["resource"])
    _valid(supersede(old_report))
    _valid(entered_in_error(old_report))


def test_tasks_are_valid_r4() -> None:
    failed = build_failed_task(make_study(), "no pixels", "no-pixels", now=RECORDED)
    _valid(failed)
    _valid(build_completed_task({**failed, "id": "t1"}, report_reference="DiagnosticReport/1"))
    # A study too broken to name its patient still gets a valid Task.
    _valid(build_failed_task({"resourceType": "ImagingStudy", "id": "x"}, "bad", "input-rejected"))
    waiting = build_waiting_task(make_study(), "waiting", RECORDED, now=RECORDED)
    _valid(waiting)
    _valid(build_cancelled_task({**waiting, "id": "t2"}, "withdrawn"))
    _valid(build_completed_task({**waiting, "id": "t2"}, reason="the image arrived"))


def test_the_ingest_transaction_is_valid_r4() -> None:
    box = BoundingBox(REC.image_index, "Effusion", 10.0, 20.0, 300.5, 400.0)
    bundle, _ = build_transaction(
        [Row(2, REC)], {REC.image_index: make_png()}, {REC.image_index: (box,)}
    )
    _valid(bundle)
    for entry in bundle["entry"]:
        _valid(entry["resource"])
    _valid(study_bundle(REC, None, tag="t", status="available"))


def test_other_written_resources_are_valid_r4() -> None:
    for code_system in local_code_systems():
        _valid(code_system)
    _valid(desired_subscription("http://service.test/hook", "secret"))
    _valid(
        desired_subscription(
            "http://service.test/hook", "s", sid=MEDIA_SUBSCRIPTION_ID, criteria=MEDIA_CRITERIA
        )
    )
    _valid(operation_outcome("went wrong", code="invalid"))
