"""``cxr calibrate --from-feedback`` against the real HAPI: reviews written by the review
builders are collected for the current (untrained) weights; below the minimum nothing
changes, above it the Effusion threshold is refitted and the file is pinned to the weights."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhir_service.cli.feedback import calibrate_from_feedback, collect
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.results import build_result_transaction
from fhir_service.fhir.review import ReviewDecision, build_review_transaction
from fhir_service.settings import Settings
from models.calibration import Calibration
from models.registry import resolve_weights
from tests.factories import RECORDED, make_analysis, make_heatmaps
from tests.integration.conftest import HapiServer
from tests.integration.test_builders_hapi import _new_study

pytestmark = pytest.mark.integration

MIN = 4  # a small minimum keeps the test short; the default (10) is the same code path


@pytest.fixture(scope="module")
def client(hapi: HapiServer) -> Iterator[FhirClient]:
    with FhirClient(hapi.base_url, timeout=120.0) as c:
        yield c


def _reviewed_study(
    client: FhirClient, version: str, effusion: float, present: bool, reviewer: str
) -> None:
    _, study = _new_study(client)
    analysis = make_analysis({"Effusion": effusion}, untrained=True, model_version=version)
    sha = hashlib.sha256(f"pixels of {study['id']}".encode()).hexdigest()
    response = client.transaction(
        build_result_transaction(
            study, analysis, make_heatmaps(analysis), image_sha256=sha, recorded=RECORDED
        )
    )
    locations = [e["response"]["location"].split("/_history")[0] for e in response["entry"]]
    report = client.read_reference(next(loc for loc in locations if "DiagnosticReport/" in loc))
    observations = {}
    for r in report["result"]:
        obs = client.read_reference(r["reference"])
        observations[obs["id"]] = obs
    effusion_obs = next(
        o
        for o in observations.values()
        if any(c.get("code") == "Effusion" for c in o["code"]["coding"])
    )
    ai_positive = effusion_obs["interpretation"][0]["coding"][0]["code"] == "POS"
    bundle = build_review_transaction(
        report,
        observations,
        [ReviewDecision(effusion_obs["id"], "agree" if ai_positive == present else "disagree")],
        reviewer=reviewer,
        reviewed={},
        review_id=uuid.uuid4().hex,
        recorded=datetime.now(UTC),
    )
    assert bundle is not None
    client.transaction(bundle)


def test_calibrate_from_feedback(
    client: FhirClient, test_settings: Settings, tmp_path: Path
) -> None:
    loaded = resolve_weights("untrained")
    version = loaded.model_version
    reviewer = f"Practitioner/rad-cal-{uuid.uuid4().hex[:8]}"
    client.request(
        "PUT",
        reviewer,
        json={"resourceType": "Practitioner", "id": reviewer.split("/")[1]},
    )
    out = tmp_path / "calibration.json"
    settings = test_settings.model_copy(update={"calibration_file": None})
    before = collect(settings, version)
    effusion_before = [d for d in before.decisions if d.finding == "Effusion"]

    # Present effusions score 0.35–0.44, absent ones 0.05–0.17: the AI's 0.5 threshold
    # misses every present one; the radiologists' reads place the threshold between.
    cases = [(0.35 + 0.03 * i, True) for i in range(MIN)] + [
        (0.05 + 0.03 * i, False) for i in range(MIN)
    ]
    for value, present in cases:
        _reviewed_study(client, version, value, present, reviewer)

    # Below the minimum (here: an unreachable one) it says so and writes nothing.
    assert not calibrate_from_feedback(
        settings, out=out, min_decisions=10_000, target_sensitivity=None
    )
    assert not out.exists()

    found = collect(settings, version)
    effusion = [d for d in found.decisions if d.finding == "Effusion"]
    assert len(effusion) == len(effusion_before) + len(cases)
    assert calibrate_from_feedback(settings, out=out, min_decisions=MIN, target_sensitivity=None)
    calibration = Calibration.load(out)
    assert calibration.weights_sha256 == loaded.sha256
    threshold = calibration.classes["Effusion"].threshold
    assert threshold is not None and 0.1 < threshold < 0.5
    assert "feedback" in calibration.classes["Effusion"].threshold_rule
    assert calibration.meta["feedback"]["refitted"] == ["Effusion"]
