"""Radiologists' decisions read back from FHIR (fhir_service.fhir.feedback)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir_service.fhir.feedback import decisions_from, feedback_search_params, model_matches
from fhir_service.fhir.review import ReviewDecision, build_review_transaction
from tests.fhir.test_review import by_kind, stored_result

VERSION = "densenet121-res224-nih+sha256:0123abcd"


def _stored_reviews(decisions: list[ReviewDecision], reviewer: str, when: int) -> Any:
    report, observations = stored_result()
    bundle = build_review_transaction(
        report,
        observations,
        decisions,
        reviewer=reviewer,
        reviewed={},
        review_id=f"review-{when:04d}",
        recorded=datetime(2026, 12, 2, 10, when, tzinfo=UTC),
    )
    assert bundle is not None
    humans = [
        {**e["resource"], "id": f"h{when}-{i}"}
        for i, e in enumerate(by_kind(bundle, "Observation", "POST"))
    ]
    return report, observations, humans


def _device(version: str) -> dict[str, Any]:
    return {"resourceType": "Device", "id": "device-1", "version": [{"value": version}]}


def test_labels_logits_and_the_latest_review_win() -> None:
    ids = list(stored_result()[1])
    verdicts = ["agree", "disagree", "uncertain"]
    _, observations, first = _stored_reviews(
        [ReviewDecision(o, v) for o, v in zip(ids[:3], verdicts, strict=True)],  # type: ignore[arg-type]
        "Practitioner/a",
        1,
    )
    _, _, later = _stored_reviews([ReviewDecision(ids[0], "disagree")], "Practitioner/b", 2)
    resources = [*first, *later, *observations.values(), _device(VERSION)]
    found = decisions_from(resources, weights_version=VERSION.split("+")[0])
    by = {d.observation_id: d for d in found.decisions}
    assert set(by) == {ids[0], ids[1]}
    assert found.skipped == {"uncertain (no label)": 1}
    ai = observations[ids[0]]
    ai_positive = ai["interpretation"][0]["coding"][0]["code"] == "POS"
    # ids[0]: agreed by a, then disagreed by b: b's (the latest) counts.
    assert by[ids[0]].label == (0 if ai_positive else 1)
    assert by[ids[0]].reviewer == "Practitioner/b"
    logit = next(c for c in ai["component"] if c["code"]["coding"][0]["code"] == "logit")
    assert by[ids[0]].logit == logit["valueQuantity"]["value"]
    assert by[ids[0]].ai_value == ai["valueQuantity"]["value"]


def test_other_model_versions_are_left_out() -> None:
    _, observations, humans = _stored_reviews(
        [ReviewDecision(next(iter(stored_result()[1])), "agree")], "Practitioner/a", 1
    )
    found = decisions_from(
        [*humans, *observations.values(), _device("other-model@1234")],
        weights_version="densenet121-res224-nih",
    )
    assert found.decisions == []
    assert found.skipped == {"another model version": 1}


def test_model_matches() -> None:
    assert model_matches("w@abc", "w@abc")
    assert model_matches("w@abc+cal2-123", "w@abc")
    assert model_matches("untrained-w@abc (untrained)", "untrained-w@abc")
    assert not model_matches("w@abcd", "w@abc")
    assert not model_matches(None, "w@abc")


def test_search_params_include_the_ai_observations_and_devices() -> None:
    params = feedback_search_params()
    assert params["_include"] == "Observation:derived-from"
    assert params["_include:iterate"] == "Observation:device"
    assert params["identifier"].endswith("cxr-radiologist-review|")
