"""The precision gate's arithmetic, on arrays made to pass or to fail each criterion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.precision_gate import GateLimits, GateReport, compare

FINDINGS = ("A", "B", "C")


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 40
    return {
        "reference_probability": rng.uniform(0.05, 0.95, (n, 3)),
        "reference_cams": rng.normal(size=(n, 3, 7, 7)),
        "reference_features": rng.normal(size=(n, 16)),
    }


def _judge(ref: dict[str, np.ndarray], **candidate: np.ndarray) -> GateReport:
    cand = {
        "candidate_probability": ref["reference_probability"],
        "candidate_cams": ref["reference_cams"],
        "candidate_features": ref["reference_features"],
    } | candidate
    return compare(
        runtime="openvino",
        precision="int8",
        weights_sha256="ab" * 32,
        thresholds=np.full(3, 0.5),
        findings=FINDINGS,
        **ref,
        **cand,
    )


def test_identical_outputs_pass() -> None:
    ref = _arrays()
    report = _judge(ref)
    assert report.passed, report.failures
    assert report.max_abs_delta_probability == 0.0
    assert report.flag_agreement == 1.0
    assert report.cam_correlation_min == pytest.approx(1.0)
    assert "PASSED" in report.summary()


def test_small_noise_passes_and_is_measured() -> None:
    ref = _arrays()
    rng = np.random.default_rng(1)
    p = ref["reference_probability"]
    report = _judge(
        ref,
        candidate_probability=p + rng.uniform(-0.005, 0.005, p.shape),
        candidate_cams=ref["reference_cams"] * 1.01 + 0.01 * rng.normal(size=(40, 3, 7, 7)),
    )
    assert 0.0 < report.max_abs_delta_probability <= 0.005
    assert 0.99 < report.cam_correlation_min < 1.0
    # a Δp of 0.005 can flip a pair that sits on the threshold; here none is that close
    assert report.passed == (report.flag_agreement >= 0.99)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("probability", "max |Δp|"),
        ("flags", "flags identical"),
        ("cams", "CAM r min"),
    ],
)
def test_each_criterion_can_fail(change: str, reason: str) -> None:
    ref = _arrays()
    p = ref["reference_probability"].copy()
    if change == "probability":
        report = _judge(ref, candidate_probability=p + 0.03 * (p < 0.45))  # no flag crosses
        assert report.flag_agreement == 1.0
    elif change == "flags":
        # pairs just below the threshold move just above it: tiny Δp, different flags
        p[:, 0] = 0.499
        ref["reference_probability"] = p
        report = _judge(ref, candidate_probability=np.where(p == 0.499, 0.501, p))
        assert report.max_abs_delta_probability < 0.02
    else:
        cams = ref["reference_cams"].copy()
        cams[3, 1] = np.random.default_rng(2).normal(size=(7, 7))  # one map scrambled
        report = _judge(ref, candidate_cams=cams)
    assert not report.passed
    assert any(reason in f for f in report.failures), report.failures
    assert "FAILED" in report.summary()


def test_delta_auroc_with_labels() -> None:
    ref = _arrays()
    p = ref["reference_probability"]
    labels = {
        "A": p[:, 0] > 0.5,  # perfectly ranked by the reference
        "B": np.zeros(40, bool),  # one class only: skipped, named
    }
    swapped = p.copy()
    order = np.argsort(p[:, 0])
    swapped[order[18:22], 0] = swapped[order[18:22][::-1], 0]  # reorder around the threshold
    report = compare(
        runtime="onnx",
        precision="int8",
        weights_sha256="cd" * 32,
        thresholds=np.full(3, 0.9),
        findings=FINDINGS,
        candidate_probability=swapped,
        candidate_cams=ref["reference_cams"],
        candidate_features=ref["reference_features"],
        labels=labels,
        **ref,
    )
    assert set(report.delta_auroc) == {"A"} and report.auroc_skipped == ["B"]
    assert report.delta_auroc["A"] > 0.005
    assert any("ΔAUROC A" in f for f in report.failures)


def test_report_round_trips_and_rejects_foreign_json(tmp_path: Path) -> None:
    report = _judge(_arrays(), candidate_probability=_arrays()["reference_probability"] + 0.1)
    path = tmp_path / "g.gate.json"
    report.write(path)
    back = GateReport.read(path)
    assert back == report and not back.passed
    assert back.limits == GateLimits()
    path.write_text('{"gate_version": 0}')
    assert GateReport.read(path) is None
    path.write_text("not json")
    assert GateReport.read(path) is None
