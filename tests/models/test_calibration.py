"""Temperature + bias calibration: ECE falls on miscalibrated logits; the file round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr_errors import ConfigError
from models.calibration import (
    Calibration,
    expected_calibration_error,
    fit_calibration,
    sigmoid,
    split_indices,
)
from models.classifier import Classifier
from models.registry import resolve_weights
from models.types import NIH_FINDINGS


def _miscalibrated(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """True logit t; the 'model' reports 3·t + 1 (overconfident and shifted)."""
    rng = np.random.default_rng(0)
    true_logit = rng.normal(-1.0, 1.5, size=(n, len(NIH_FINDINGS)))
    labels = (rng.random(true_logit.shape) < sigmoid(true_logit)).astype(float)
    return 3.0 * true_logit + 1.0, labels


SHA = "ab" * 32


def test_ece_falls_on_the_held_out_split() -> None:
    logits, labels = _miscalibrated()
    calibration = fit_calibration(logits, labels, weights_sha256=SHA)
    z, _ = calibration.apply(logits)
    _, held_out = split_indices(len(logits), 0.3)
    for k, name in enumerate(NIH_FINDINGS):
        before = expected_calibration_error(sigmoid(logits[held_out, k]), labels[held_out, k])
        after = expected_calibration_error(sigmoid(z[held_out, k]), labels[held_out, k])
        fit = calibration.classes[name]
        assert fit.calibrated and fit.n_validation == len(held_out) == 600
        assert after < before / 2, name
        assert fit.ece_before == pytest.approx(before) and fit.ece_after == pytest.approx(after)
        assert fit.brier_after < fit.brier_before
        assert fit.temperature == pytest.approx(3.0, rel=0.2)  # 1,400 fitting images
        assert fit.bias == pytest.approx(-1.0 / 3.0, abs=0.25)


def test_file_round_trips(tmp_path: Path) -> None:
    logits, labels = _miscalibrated(300)
    calibration = fit_calibration(logits, labels, weights_name="w", weights_sha256=SHA)
    path = tmp_path / "cal.json"
    calibration.save(path)
    loaded = Calibration.load(path)
    assert loaded.version == calibration.version and loaded.version.startswith("cal2-")
    assert loaded.weights_sha256 == SHA
    assert loaded.classes == calibration.classes
    for a, b in zip(calibration.arrays(), loaded.arrays(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_file_and_wrong_weights_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a cxr-fhir-calibration"):
        Calibration.load(bad)
    logits, labels = _miscalibrated(100)
    other = fit_calibration(logits, labels, weights_name="other", weights_sha256="cd" * 32)
    with pytest.raises(ConfigError, match="re-run `cxr calibrate`"):
        Classifier(resolve_weights("untrained"), backend="torch", calibration=other)


def test_calibrated_classifier_version_and_band(tmp_path: Path) -> None:
    loaded = resolve_weights("untrained")
    logits, labels = _miscalibrated(200)
    calibration = fit_calibration(logits, labels, weights_sha256=loaded.sha256)
    classifier = Classifier(loaded, backend="torch", calibration=calibration, tta=False)
    assert classifier.model_version.endswith("+" + calibration.version)
    import torch

    (analysis,) = classifier.analyze([torch.zeros(1, 224, 224)])
    for f in analysis.findings:
        # without TTA the band is the fit's uncertainty alone: narrow but not empty
        assert f.band_low < f.calibrated_probability < f.band_high


def test_temperature_is_always_positive_on_small_label_sets() -> None:
    """30 images with random or anti-correlated labels: an unconstrained fit inverts some;
    the log-temperature fit never does."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        logits = rng.normal(0.0, 2.0, size=(30, len(NIH_FINDINGS)))
        labels = (rng.random(logits.shape) < sigmoid(-logits)).astype(float)
        calibration = fit_calibration(logits, labels, weights_sha256=SHA, min_positives=3)
        for fit in calibration.classes.values():
            assert fit.scale > 0 and fit.temperature > 0


def test_too_few_positives_stay_uncalibrated_and_say_so() -> None:
    logits, labels = _miscalibrated(400)
    labels[:, 13] = 0.0
    labels[:3, 13] = 1.0  # Hernia: 3 positives
    calibration = fit_calibration(logits, labels, weights_sha256=SHA)
    hernia = calibration.classes["Hernia"]
    assert not hernia.calibrated and hernia.scale == 1.0 and hernia.bias == 0.0
    assert "left uncalibrated" in hernia.note and "fewer than 10" in hernia.note
    assert hernia.threshold is None
    assert calibration.classes["Atelectasis"].calibrated
    loaded = resolve_weights("untrained")
    calibration = fit_calibration(logits, labels, weights_sha256=loaded.sha256)
    classifier = Classifier(loaded, backend="torch", calibration=calibration, tta=False)
    import torch

    (analysis,) = classifier.analyze([torch.zeros(1, 224, 224)])
    assert not analysis.finding("Hernia").calibrated
    assert analysis.finding("Hernia").band_kind == "none"
    assert analysis.finding("Atelectasis").calibrated
    assert analysis.finding("Atelectasis").band_kind == "calibration"


def test_thresholds_for_a_target_sensitivity_or_youden() -> None:
    logits, labels = _miscalibrated(3000)
    calibration = fit_calibration(logits, labels, weights_sha256=SHA, target_sensitivity=0.9)
    for fit in calibration.classes.values():
        assert fit.threshold is not None and fit.threshold_rule == "sensitivity 0.9"
        assert 0.8 <= fit.validation_sensitivity <= 1.0
        assert 0.0 < fit.validation_specificity < 1.0
    youden = fit_calibration(logits, labels, weights_sha256=SHA, target_sensitivity=None)
    for name, fit in youden.classes.items():
        assert fit.threshold_rule == "youden"
        # Youden trades sensitivity for specificity against a 0.9 sensitivity target
        assert fit.validation_specificity >= calibration.classes[name].validation_specificity - 0.05
    loaded = resolve_weights("untrained")
    cal = fit_calibration(logits, labels, weights_sha256=loaded.sha256)
    classifier = Classifier(loaded, backend="torch", calibration=cal, tta=False)
    assert list(classifier.thresholds) == [cal.classes[f].threshold for f in NIH_FINDINGS]


def test_a_file_without_the_weights_hash_is_refused(tmp_path: Path) -> None:
    logits, labels = _miscalibrated(100)
    doc = fit_calibration(logits, labels, weights_sha256=SHA).to_json()
    doc["weights_sha256"] = ""
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="does not record the sha256"):
        Calibration.load(path)
