"""Evaluation metrics: equal to scikit-learn on random data, a bootstrap interval that covers the
known AUROC of binormal scores, operating points, and the localisation measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from models.evaluation import (
    Box,
    average_precision,
    bootstrap_auroc,
    brier_score,
    centre_prior,
    confusion_at,
    evaluate_finding,
    expected_calibration_error,
    iobb,
    localisation_metrics,
    pointing_hit,
    roc_auc,
    threshold_for_sensitivity,
    youden_threshold,
)


@pytest.mark.parametrize("seed", range(20))
def test_auroc_and_auprc_equal_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    y = rng.random(n) < rng.uniform(0.02, 0.6)
    y[:2] = [True, False]
    # continuous scores, and coarse ones full of ties
    for scores in (rng.random(n) + 0.3 * y, np.round(rng.random(n) + 0.3 * y, 1)):
        assert abs(roc_auc(y, scores) - roc_auc_score(y, scores)) < 1e-9
        assert abs(average_precision(y, scores) - average_precision_score(y, scores)) < 1e-9
        assert abs(brier_score(scores / 2, y) - brier_score_loss(y, scores / 2)) < 1e-12


def test_undefined_auroc_is_nan() -> None:
    assert math.isnan(roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))
    assert bootstrap_auroc([1, 1], [0.1, 0.2]).size == 0


def test_bootstrap_equals_resampled_auroc_with_the_same_draws() -> None:
    """The vectorised weights are the resample: compare one resample with scikit-learn on the
    explicitly resampled data."""
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300) + 0.5 * y, 2)  # with ties
    boot = bootstrap_auroc(y, s, resamples=1, seed=11, chunk=1)
    order = np.argsort(s, kind="mergesort")
    pos, neg = order[y[order]], order[~y[order]]
    draws = np.random.default_rng(11)
    pick_pos = pos[draws.integers(0, pos.size, size=pos.size)]
    pick_neg = neg[draws.integers(0, neg.size, size=neg.size)]
    idx = np.r_[pick_pos, pick_neg]
    assert abs(boot[0] - roc_auc_score(y[idx], s[idx])) < 1e-9


def test_binormal_interval_covers_the_true_auroc() -> None:
    """Binormal scores N(0,1) vs N(d,1) have AUROC Φ(d/√2); over 200 seeds the 95 % interval
    must cover it at least 93 % of the time."""
    d = 1.0
    true_auc = 0.5 * (1.0 + math.erf(d / math.sqrt(2.0) / math.sqrt(2.0)))  # Φ(d/√2)
    covered = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        y = np.r_[np.ones(150, bool), np.zeros(350, bool)]
        s = np.r_[rng.normal(d, 1.0, 150), rng.normal(0.0, 1.0, 350)]
        m = evaluate_finding("x", y, 1 / (1 + np.exp(-s)), resamples=500, seed=seed)
        covered += m.auroc_ci[0] <= true_auc <= m.auroc_ci[1]
    assert covered / 200 >= 0.93, covered


def test_ece_of_perfect_calibration_is_small_and_of_overconfidence_large() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = rng.random(20000) < p
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.where(p > 0.5, 0.99, 0.01), y) > 0.2


def test_operating_points() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.1, 0.05, 0.0])
    t = threshold_for_sensitivity(y, s, 0.75)
    assert t == 0.7 and confusion_at(y, s, t).sensitivity == 0.75
    c = confusion_at(y, s, 0.5)
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 1, 5, 1)
    assert c.ppv == 0.75 and c.npv == 5 / 6 and c.specificity == 5 / 6
    assert youden_threshold(y, s) == 0.7


def test_subgroups_have_their_own_auroc() -> None:
    y = np.array([1, 0, 1, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3])
    m = evaluate_finding("x", y, s, groups={"sex": ["M", "M", "F", "F", "M", None]})
    assert m.subgroups["sex"]["M"] == {"n": 3, "positives": 2, "auroc": 1.0}
    assert m.subgroups["sex"]["F"]["auroc"] == 0.0


def test_pointing_game_and_iobb() -> None:
    heat = np.zeros((100, 100))
    heat[20:40, 60:80] = 1.0
    inside, outside = Box(55, 15, 30, 30), Box(0, 0, 20, 20)
    assert pointing_hit(heat, inside) and not pointing_hit(heat, outside)
    assert iobb(heat, inside) == 1.0
    assert iobb(heat, Box(60, 20, 10, 20)) == pytest.approx(0.5)
    m = localisation_metrics("x", [(heat, inside), (heat, outside)])
    assert m.pointing == 0.5 and m.iobb_accuracy[0.7] == 0.5
    prior = centre_prior(64, 64)
    assert pointing_hit(prior, Box(24, 24, 16, 16))
