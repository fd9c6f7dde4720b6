"""Thresholds refitted from radiologists' decisions (models.feedback)."""

from __future__ import annotations

import numpy as np

from models.calibration import Calibration
from models.feedback import MIN_DECISIONS, FindingDecisions, refit_thresholds

SHA = "ab" * 32


def decisions(n_pos: int, n_neg: int, *, ai_threshold: float = 0.9) -> FindingDecisions:
    rng = np.random.default_rng(0)
    # Positives score higher than negatives, overlapping; the AI's threshold is too high.
    pos = rng.normal(1.0, 0.7, n_pos)
    neg = rng.normal(-1.0, 0.7, n_neg)
    logits = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)])
    values = 1 / (1 + np.exp(-logits))
    return FindingDecisions(logits, labels, values, np.full(logits.size, ai_threshold))


def test_enough_decisions_refit_the_threshold_and_improve_sensitivity() -> None:
    current = Calibration.identity()
    calibration, rows = refit_thresholds(
        current,
        {"Effusion": decisions(30, 40), "Mass": decisions(3, 20)},
        weights_name="w",
        weights_sha256=SHA,
    )
    assert calibration is not None
    by = {r.finding: r for r in rows}
    effusion = by["Effusion"]
    assert effusion.refit and effusion.threshold_after is not None
    assert effusion.sensitivity_after > effusion.sensitivity_before
    assert effusion.sensitivity_after + effusion.specificity_after > 1.5
    assert calibration.classes["Effusion"].threshold == effusion.threshold_after
    assert calibration.classes["Effusion"].threshold_rule.startswith("feedback: refitted by")
    # Too few positives: kept, and said so; the file keeps its old threshold (none).
    assert not by["Mass"].refit
    assert "3 positive and 20 negative decisions, fewer than 10" in by["Mass"].note
    assert calibration.classes["Mass"].threshold is None
    assert calibration.weights_sha256 == SHA
    assert calibration.version.startswith("cal") and calibration.version != current.version
    assert calibration.meta["feedback"]["refitted"] == ["Effusion"]
    # Temperature and bias are untouched: only thresholds come from feedback.
    assert calibration.classes["Effusion"].scale == current.classes["Effusion"].scale


def test_below_the_minimum_nothing_is_produced() -> None:
    calibration, rows = refit_thresholds(
        Calibration.identity(),
        {"Effusion": decisions(MIN_DECISIONS - 1, 50)},
        weights_name="w",
        weights_sha256=SHA,
    )
    assert calibration is None
    (row,) = rows
    assert not row.refit and row.threshold_after is None
    assert row.sensitivity_before == row.sensitivity_before  # reported even so (not NaN)


def test_target_sensitivity_is_reached() -> None:
    calibration, rows = refit_thresholds(
        Calibration.identity(),
        {"Edema": decisions(20, 20)},
        weights_name="w",
        weights_sha256=SHA,
        target_sensitivity=0.95,
    )
    assert calibration is not None
    assert rows[0].sensitivity_after >= 0.95
