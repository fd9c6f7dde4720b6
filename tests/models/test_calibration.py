"""Temperature + bias calibration: ECE falls on miscalibrated logits; the file round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_errors import ConfigError
from models.calibration import Calibration, expected_calibration_error, fit_calibration, sigmoid
from models.classifier import Classifier
from models.registry import resolve_weights
from models.types import NIH_FINDINGS


def _miscalibrated(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """True logit t; the 'model' reports 3·t + 1 (overconfident and shifted)."""
    rng = np.random.default_rng(0)
    true_logit = rng.normal(-1.0, 1.5, size=(n, len(NIH_FINDINGS)))
    labels = (rng.random(true_logit.shape) < sigmoid(true_logit)).astype(float)
    return 3.0 * true_logit + 1.0, labels


def test_ece_falls_after_fit() -> None:
    logits, labels = _miscalibrated()
    calibration = fit_calibration(logits, labels)
    z, _ = calibration.apply(logits)
    for k, name in enumerate(NIH_FINDINGS):
        before = expected_calibration_error(sigmoid(logits[:, k]), labels[:, k])
        after = expected_calibration_error(sigmoid(z[:, k]), labels[:, k])
        fit = calibration.classes[name]
        assert after < before / 2, name
        assert fit.ece_after == pytest.approx(after) and fit.brier_after < fit.brier_before
        assert fit.temperature == pytest.approx(3.0, rel=0.15)
        assert fit.bias == pytest.approx(-1.0 / 3.0, abs=0.15)


def test_file_round_trips(tmp_path: Path) -> None:
    logits, labels = _miscalibrated(300)
    calibration = fit_calibration(logits, labels, weights_name="w", weights_sha256="ab" * 32)
    path = tmp_path / "cal.json"
    calibration.save(path)
    loaded = Calibration.load(path)
    assert loaded.version == calibration.version and loaded.version.startswith("cal1-")
    assert loaded.weights_sha256 == "ab" * 32
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
