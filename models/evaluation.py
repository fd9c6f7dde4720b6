"""Model evaluation: discrimination, calibration, operating points, subgroups, localisation.

Pure numpy on plain arrays (labels ``[N, K]`` 0/1, probabilities ``[N, K]``); no FHIR, HTTP or
Settings. ``cxr evaluate`` (``fhir_service/cli/evaluate.py``) reads the files and presents the
results; ``cxr calibrate`` uses the operating-point functions.

* AUROC is the Mann–Whitney statistic with tied scores counted ½ (what scikit-learn's
  ``roc_auc_score`` computes); AUPRC is average precision, Σ (R_n − R_{n−1}) P_n over the
  distinct thresholds (scikit-learn's ``average_precision_score``).
* The 95 % AUROC interval is a seeded, stratified percentile bootstrap (positives and negatives
  resampled separately, as pROC does). It is vectorised: the scores are sorted once, and each
  resample is a vector of draw counts, so a resample's AUROC is a weighted cumulative sum over
  the fixed order — no per-resample sort.
* ECE: equal-width bins (15 by default), Σ_b (n_b / n) · |mean(p_b) − mean(y_b)|.
* Localisation (NIH boxes): the pointing game (is the heatmap's maximum inside the box) and
  IoBB accuracy (the box around the heatmap's pixels at or above half its range; IoBB =
  area(that ∩ truth) / area(that), a hit when ≥ T), as in Wang et al. (CVPR 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "AGE_BANDS",
    "ECE_BINS",
    "IOBB_THRESHOLDS",
    "Box",
    "Confusion",
    "FindingMetrics",
    "LocalisationMetrics",
    "age_band",
    "average_precision",
    "bootstrap_auroc",
    "brier_score",
    "centre_prior",
    "confusion_at",
    "evaluate_finding",
    "expected_calibration_error",
    "iobb",
    "localisation_metrics",
    "pointing_hit",
    "reliability_curve",
    "roc_auc",
    "roc_curve",
    "threshold_for_sensitivity",
    "youden_threshold",
]

FloatArray = npt.NDArray[np.float64]
ECE_BINS = 15
IOBB_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: (label, lowest age, highest age) in years, inclusive
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("0-17", 0, 17),
    ("18-39", 18, 39),
    ("40-59", 40, 59),
    ("60-79", 60, 79),
    ("80+", 80, 200),
)
Progress = Callable[[int], None]


def _xy(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y.astype(bool), s


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (NaN when one class is absent); ties count ½."""
    y, s = _xy(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], s.size]
    average = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, ends - starts)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _thresholds(
    y: npt.NDArray[np.bool_], s: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Distinct thresholds (descending) with true and false positives at ``score >= t``."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    return s_sorted[last], tps, fps


def roc_curve(
    labels: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    y, s = _xy(labels, scores)
    thresholds, tps, fps = _thresholds(y, s)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return (
        np.r_[0.0, fps / n_neg],
        np.r_[0.0, tps / n_pos],
        np.r_[np.inf, thresholds],
    )


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Σ (R_n − R_{n−1}) P_n over distinct thresholds; NaN without positives."""
    y, s = _xy(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    _, tps, fps = _thresholds(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _draw_counts(rng: np.random.Generator, n: int, rows: int) -> npt.NDArray[np.float64]:
    """[rows, n] how often each of n items is drawn in ``rows`` resamples of size n."""
    draws = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
    counts: npt.NDArray[np.float64] = (
        np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
    )
    return counts


def bootstrap_auroc(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    resamples: int = 1000,
    seed: int = 0,
    chunk: int = 100,
    progress: Progress | None = None,
) -> FloatArray:
    """AUROC of ``resamples`` stratified bootstrap resamples (empty when a class is absent)."""
    y, s = _xy(labels, scores)
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    pos, neg = np.flatnonzero(y_sorted), np.flatnonzero(~y_sorted)
    if pos.size == 0 or neg.size == 0:
        return np.zeros(0)
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ties = starts.size < s.size
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for first in range(0, resamples, chunk):
        rows = min(chunk, resamples - first)
        w_pos = np.zeros((rows, s.size))
        w_neg = np.zeros((rows, s.size))
        w_pos[:, pos] = _draw_counts(rng, pos.size, rows)
        w_neg[:, neg] = _draw_counts(rng, neg.size, rows)
        if ties:  # a tie group is one threshold: sum its weights
            w_pos = np.add.reduceat(w_pos, starts, axis=1)
            w_neg = np.add.reduceat(w_neg, starts, axis=1)
        below = np.cumsum(w_neg, axis=1) - w_neg
        out[first : first + rows] = (w_pos * (below + 0.5 * w_neg)).sum(axis=1) / (
            pos.size * neg.size
        )
        if progress is not None:
            progress(rows)
    return out


def expected_calibration_error(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, bins: int = ECE_BINS
) -> float:
    """ECE with equal-width bins: Σ_b (n_b / n) · |mean(p_b) − mean(y_b)|."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.size == 0:
        return math.nan
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, p, minlength=bins) - np.bincount(idx, y, minlength=bins))
    return float(gap.sum() / p.size) if count.sum() else math.nan


def reliability_curve(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, bins: int = ECE_BINS
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """(mean predicted, observed frequency, count) per equal-width bin; NaN for empty bins."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, p, minlength=bins) / count
        freq = np.bincount(idx, y, minlength=bins) / count
    return mean_p, freq, count.astype(np.int64)


def brier_score(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else math.nan


@dataclass(frozen=True)
class Confusion:
    """Decisions ``score >= threshold`` against the labels."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @staticmethod
    def _ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    @property
    def sensitivity(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return self._ratio(self.tn, self.tn + self.fn)

    def to_json(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "ppv": self.ppv,
            "npv": self.npv,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
        }


def confusion_at(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> Confusion:
    y, s = _xy(labels, scores)
    flagged = s >= threshold
    return Confusion(
        threshold=float(threshold),
        tp=int((flagged & y).sum()),
        fp=int((flagged & ~y).sum()),
        tn=int((~flagged & ~y).sum()),
        fn=int((~flagged & y).sum()),
    )


def threshold_for_sensitivity(labels: npt.ArrayLike, scores: npt.ArrayLike, target: float) -> float:
    """The highest threshold whose sensitivity (``score >= t``) is at least ``target``."""
    y, s = _xy(labels, scores)
    positives = np.sort(s[y])[::-1]
    if positives.size == 0:
        return math.nan
    k = min(positives.size, max(1, math.ceil(target * positives.size)))
    return float(positives[k - 1])


def youden_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """The threshold maximising sensitivity + specificity − 1."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax((tpr - fpr)[1:])) + 1  # skip the +inf start
    return float(thresholds[best])


def age_band(age: float | None) -> str | None:
    if age is None or math.isnan(age):
        return None
    return next((label for label, low, high in AGE_BANDS if low <= age <= high), None)


@dataclass(frozen=True)
class FindingMetrics:
    """One finding on one label set."""

    finding: str
    n: int
    positives: int
    auroc: float
    auroc_ci: tuple[float, float]
    auprc: float
    ece: float
    brier: float
    operating_point: Confusion | None
    subgroups: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """attribute → group → {n, positives, auroc}"""

    @property
    def prevalence(self) -> float:
        return self.positives / self.n if self.n else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "n": self.n,
            "positives": self.positives,
            "prevalence": self.prevalence,
            "auroc": self.auroc,
            "auroc_ci95": list(self.auroc_ci),
            "auprc": self.auprc,
            "ece": self.ece,
            "brier": self.brier,
            "operating_point": None
            if self.operating_point is None
            else self.operating_point.to_json(),
            "subgroups": self.subgroups,
        }


def _subgroups(
    y: npt.NDArray[np.bool_], s: FloatArray, groups: Mapping[str, Sequence[str | None]]
) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for attribute, values in groups.items():
        column = np.array([v if v is not None else "" for v in values], dtype=object)
        out[attribute] = {}
        for group in sorted({v for v in values if v}):
            mask = column == group
            out[attribute][group] = {
                "n": int(mask.sum()),
                "positives": int(y[mask].sum()),
                "auroc": roc_auc(y[mask], s[mask]),
            }
    return out


def evaluate_finding(
    finding: str,
    labels: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    *,
    threshold: float | None = None,
    groups: Mapping[str, Sequence[str | None]] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    progress: Progress | None = None,
) -> FindingMetrics:
    """Every metric of one finding; the bootstrap is seeded with ``seed``."""
    y, p = _xy(labels, probabilities)
    boot = bootstrap_auroc(y, p, resamples=resamples, seed=seed, progress=progress)
    tail = (1.0 - level) / 2.0 * 100.0
    ci = (
        (float(np.percentile(boot, tail)), float(np.percentile(boot, 100.0 - tail)))
        if boot.size
        else (math.nan, math.nan)
    )
    return FindingMetrics(
        finding=finding,
        n=int(y.size),
        positives=int(y.sum()),
        auroc=roc_auc(y, p),
        auroc_ci=ci,
        auprc=average_precision(y, p),
        ece=expected_calibration_error(p, y),
        brier=brier_score(p, y),
        operating_point=None if threshold is None else confusion_at(y, p, threshold),
        subgroups=_subgroups(y, p, groups or {}),
    )


# --------------------------------------------------------------------------- localisation


@dataclass(frozen=True)
class Box:
    """A ground-truth box in the heatmap's pixel coordinates (top-left corner and size)."""

    x: float
    y: float
    width: float
    height: float


def pointing_hit(heatmap: npt.NDArray[np.floating[Any]], box: Box) -> bool:
    """Whether the heatmap's maximum lies inside the box."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    inside_x = box.x <= float(col) + 0.5 <= box.x + box.width
    return bool(inside_x and box.y <= float(row) + 0.5 <= box.y + box.height)


def iobb(heatmap: npt.NDArray[np.floating[Any]], box: Box, level: float = 0.5) -> float:
    """area(predicted ∩ truth) / area(predicted); predicted = the box around the pixels at or
    above ``level`` of the heatmap's range."""
    h = np.asarray(heatmap, dtype=np.float64)
    low, high = float(h.min()), float(h.max())
    if high <= low:
        return 0.0
    rows, cols = np.nonzero(h >= low + level * (high - low))
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    inter_w = max(0.0, min(right, box.x + box.width) - max(left, box.x))
    inter_h = max(0.0, min(bottom, box.y + box.height) - max(top, box.y))
    return float(inter_w * inter_h / ((right - left) * (bottom - top)))


def centre_prior(height: int, width: int) -> FloatArray:
    """The control heatmap: a Gaussian at the image centre, σ = a quarter of each side."""
    yy = (np.arange(height) + 0.5 - height / 2.0) / (height / 4.0)
    xx = (np.arange(width) + 0.5 - width / 2.0) / (width / 4.0)
    prior: FloatArray = np.exp(-0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2))
    return prior


@dataclass(frozen=True)
class LocalisationMetrics:
    """Pointing game and IoBB accuracy of one finding's boxes."""

    finding: str
    boxes: int
    pointing: float
    iobb_accuracy: dict[float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "boxes": self.boxes,
            "pointing_game": self.pointing,
            "iobb_accuracy": {f"{t:.1f}": a for t, a in self.iobb_accuracy.items()},
        }


def localisation_metrics(
    finding: str, pairs: Sequence[tuple[npt.NDArray[np.floating[Any]], Box]]
) -> LocalisationMetrics:
    """``pairs``: (heatmap in image pixels, its ground-truth box), one per box."""
    if not pairs:
        return LocalisationMetrics(finding, 0, math.nan, {t: math.nan for t in IOBB_THRESHOLDS})
    hits = [pointing_hit(h, b) for h, b in pairs]
    overlaps = np.array([iobb(h, b) for h, b in pairs])
    return LocalisationMetrics(
        finding=finding,
        boxes=len(pairs),
        pointing=float(np.mean(hits)),
        iobb_accuracy={t: float(np.mean(overlaps >= t)) for t in IOBB_THRESHOLDS},
    )
