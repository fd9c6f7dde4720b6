"""Per-site operating thresholds refitted from radiologists' decisions (issue 18).

Each decision is one AI finding a radiologist agreed or disagreed with: the model's raw logit
and the radiologist's label. For a finding with at least ``MIN_DECISIONS`` positive *and*
``MIN_DECISIONS`` negative labels, the operating threshold on the calibrated probability
(the current calibration applied to the logit, so temperature and bias stay as they are) is
refitted — by Youden's J, or for a target sensitivity — and sensitivity/specificity are
reported before (the calls the AI actually made: its recorded value against its recorded
threshold) and after (the new threshold), both against the same decisions (in-sample: the
numbers say how the threshold fits the site's reads, not how it generalises).

Why ten of each: a threshold is placed between the scores of the two classes; with fewer than
ten positives one case moves the sensitivity by more than ten points and Youden's optimum
jumps with it. It is the same floor ``cxr calibrate`` uses for a class to be fitted at all
(:data:`models.calibration.MIN_POSITIVES`). A finding below it keeps its threshold; when no
finding reaches it, nothing is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from models.calibration import FORMAT_VERSION, MIN_POSITIVES, Calibration, sigmoid
from models.evaluation import confusion_at, threshold_for_sensitivity, youden_threshold
from models.types import NIH_FINDINGS

__all__ = ["MIN_DECISIONS", "FindingDecisions", "ThresholdRefit", "refit_thresholds"]

#: positives and negatives (each) a finding needs before its threshold is refitted
MIN_DECISIONS = MIN_POSITIVES


@dataclass(frozen=True)
class FindingDecisions:
    """One finding's labelled decisions (arrays of equal length)."""

    logits: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    ai_values: npt.NDArray[np.float64]
    ai_thresholds: npt.NDArray[np.float64]


@dataclass(frozen=True)
class ThresholdRefit:
    finding: str
    n_positive: int
    n_negative: int
    refit: bool
    note: str
    sensitivity_before: float
    specificity_before: float
    threshold_after: float | None = None
    sensitivity_after: float = float("nan")
    specificity_after: float = float("nan")


def _rates(labels: npt.NDArray[np.int64], flagged: npt.NDArray[np.bool_]) -> tuple[float, float]:
    y = labels.astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    sens = float((flagged & y).sum() / pos) if pos else float("nan")
    spec = float((~flagged & ~y).sum() / neg) if neg else float("nan")
    return sens, spec


def _refit_one(
    name: str,
    d: FindingDecisions,
    calibration: Calibration,
    min_decisions: int,
    target_sensitivity: float | None,
) -> ThresholdRefit:
    positives = int(d.labels.sum())
    negatives = int(d.labels.size - positives)
    before = _rates(d.labels, d.ai_values >= d.ai_thresholds)
    if min(positives, negatives) < min_decisions:
        return ThresholdRefit(
            name,
            positives,
            negatives,
            False,
            f"kept: {positives} positive and {negatives} negative decisions, fewer than "
            f"{min_decisions} of each",
            *before,
        )
    k = NIH_FINDINGS.index(name)
    x = np.zeros((d.logits.size, len(NIH_FINDINGS)))
    x[:, k] = d.logits
    z, _ = calibration.apply(x)
    probability = sigmoid(z[:, k])
    if target_sensitivity is None:
        threshold, rule = youden_threshold(d.labels, probability), "Youden's J"
    else:
        threshold = threshold_for_sensitivity(d.labels, probability, target_sensitivity)
        rule = f"sensitivity {target_sensitivity:g}"
    after = confusion_at(d.labels, probability, threshold)
    return ThresholdRefit(
        name,
        positives,
        negatives,
        True,
        f"refitted by {rule} on {d.labels.size} radiologist decisions",
        *before,
        threshold_after=float(threshold),
        sensitivity_after=after.sensitivity,
        specificity_after=after.specificity,
    )


def refit_thresholds(
    calibration: Calibration,
    decisions: Mapping[str, FindingDecisions],
    *,
    weights_name: str,
    weights_sha256: str,
    min_decisions: int = MIN_DECISIONS,
    target_sensitivity: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tuple[Calibration | None, list[ThresholdRefit]]:
    """The calibration with refitted thresholds (None when no finding had enough decisions)
    and one report row per finding that has decisions."""
    rows = [
        _refit_one(name, decisions[name], calibration, min_decisions, target_sensitivity)
        for name in NIH_FINDINGS
        if name in decisions and decisions[name].labels.size
    ]
    refit = {r.finding: r for r in rows if r.refit}
    if not refit:
        return None, rows
    base = calibration.classes or Calibration.identity().classes
    classes = {
        name: replace(
            fit,
            threshold=refit[name].threshold_after,
            threshold_rule=f"feedback: {refit[name].note}",
        )
        if name in refit
        else fit
        for name, fit in {**Calibration.identity().classes, **base}.items()
    }
    digest = hashlib.sha256(
        json.dumps(
            {n: [c.scale, c.bias, c.threshold] for n, c in classes.items()} | {"w": weights_sha256},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    feedback = {
        "refitted": sorted(refit),
        "decisions": {r.finding: [r.n_positive, r.n_negative] for r in rows},
        "min_decisions_per_class": min_decisions,
        "previous_version": calibration.version,
    }
    return (
        Calibration(
            classes=classes,
            weights_name=weights_name,
            weights_sha256=weights_sha256,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            n_images=calibration.n_images,
            version=f"cal{FORMAT_VERSION}-{digest}",
            meta={**calibration.meta, **(meta or {}), "feedback": feedback},
        ),
        rows,
    )
