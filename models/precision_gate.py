"""The precision gate: a reduced-precision graph serves only if it reproduces fp32.

Against the fp32 graph of the *same* weights, on the same images (the NIH samples):

* ``max_abs_delta_probability`` ≤ 0.02 — the largest |Δ calibrated_probability| over every
  (image, finding) pair;
* ``flag_agreement`` ≥ 0.99 — the share of (image, finding) pairs whose flag
  (calibrated_probability ≥ threshold) is the same;
* ``cam_correlation_min`` ≥ 0.98 — the lowest Pearson correlation between the fp32 and the
  candidate CAM of one (image, finding) pair (the mean is reported too);
* ``feature_correlation_min`` ≥ 0.98 — the same for one image's pooled features (or CLIP
  embedding): they are what similar-case search compares;
* ``max_delta_auroc`` ≤ 0.005 — per finding, when labels are given (trained weights: the
  gate is then ``cxr evaluate``'s AUROC on both graphs); findings without both classes among
  the images are skipped and named.

:func:`compare` is pure numpy; the runtime code (:mod:`models.reduced`) feeds it both graphs'
outputs, prints the :class:`GateReport` and stores it as JSON next to the graph it judged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.evaluation import roc_auc

__all__ = ["GATE_VERSION", "GateLimits", "GateReport", "compare"]

#: part of the stored report: a report from an older gate is not trusted
GATE_VERSION = 2


@dataclass(frozen=True)
class GateLimits:
    max_abs_delta_probability: float = 0.02
    min_flag_agreement: float = 0.99
    min_cam_correlation: float = 0.98
    min_feature_correlation: float = 0.98
    max_delta_auroc: float = 0.005


@dataclass(frozen=True)
class GateReport:
    """What the gate measured, and whether the graph may serve."""

    runtime: str
    precision: str
    weights_sha256: str
    images: int
    max_abs_delta_probability: float
    flag_agreement: float
    cam_correlation_min: float | None
    """None where the model has no CAMs (the CLIP image tower)"""
    cam_correlation_mean: float | None
    feature_correlation_min: float
    delta_auroc: dict[str, float] = field(default_factory=dict)
    auroc_skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    limits: GateLimits = field(default_factory=GateLimits)
    gate_version: int = GATE_VERSION

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_delta_auroc(self) -> float | None:
        return max(self.delta_auroc.values()) if self.delta_auroc else None

    def summary(self) -> str:
        auroc = (
            f"max ΔAUROC {self.max_delta_auroc:.4f} over {len(self.delta_auroc)} findings"
            if self.max_delta_auroc is not None
            else "ΔAUROC not measured (no labels)"
        )
        verdict = "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures)
        return (
            f"precision gate {self.runtime}/{self.precision} on {self.images} images: "
            f"max |Δp| {self.max_abs_delta_probability:.4f}, "
            f"flags identical {self.flag_agreement * 100:.2f}%, "
            + (
                f"CAM r min {self.cam_correlation_min:.4f} (mean {self.cam_correlation_mean:.4f}), "
                if self.cam_correlation_min is not None and self.cam_correlation_mean is not None
                else ""
            )
            + f"feature r min {self.feature_correlation_min:.5f}, {auroc} — {verdict}"
        )

    def to_json(self) -> str:
        body = asdict(self) | {"passed": self.passed}
        return json.dumps(body, indent=2, sort_keys=True)

    def write(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> GateReport | None:
        """The stored report, or None when it is missing, unreadable or from another gate."""
        try:
            body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            if body.get("gate_version") != GATE_VERSION:
                return None
            body.pop("passed", None)
            body["limits"] = GateLimits(**body["limits"])
            return cls(**body)
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _row_correlation(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    """Pearson r of each row of a against the same row of b ([N, D] → [N]).

    A row that is constant in both is a perfect match (r = 1); constant in one only, r = 0.
    """
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / (na * nb)
    both_flat = (na == 0) & (nb == 0)
    return np.where(both_flat, 1.0, np.nan_to_num(r, nan=0.0))


def _delta_auroc(
    ref_p: npt.NDArray[np.float64],
    cand_p: npt.NDArray[np.float64],
    findings: Sequence[str],
    labels: Mapping[str, npt.NDArray[np.bool_]] | None,
) -> tuple[dict[str, float], list[str]]:
    """|ΔAUROC| per labelled finding, and the findings whose labels are all one class."""
    delta_auroc: dict[str, float] = {}
    skipped: list[str] = []
    for j, finding in enumerate(findings):
        y = None if labels is None else labels.get(finding)
        if y is None:
            continue
        if y.all() or not y.any():
            skipped.append(finding)
            continue
        delta_auroc[finding] = abs(roc_auc(y, ref_p[:, j]) - roc_auc(y, cand_p[:, j]))
    return delta_auroc, skipped


def _failures(
    limits: GateLimits,
    max_dp: float,
    agreement: float,
    cams_r: npt.NDArray[np.float64] | None,
    feats_r: npt.NDArray[np.float64],
    delta_auroc: Mapping[str, float],
) -> list[str]:
    """Each criterion the candidate misses, with its number and the limit."""
    failures = []
    if not max_dp <= limits.max_abs_delta_probability:
        failures.append(f"max |Δp| {max_dp:.4f} > {limits.max_abs_delta_probability}")
    if not agreement >= limits.min_flag_agreement:
        failures.append(f"flags identical {agreement:.4f} < {limits.min_flag_agreement}")
    if cams_r is not None and not float(cams_r.min()) >= limits.min_cam_correlation:
        failures.append(f"CAM r min {float(cams_r.min()):.4f} < {limits.min_cam_correlation}")
    if not float(feats_r.min()) >= limits.min_feature_correlation:
        failures.append(
            f"feature r min {float(feats_r.min()):.4f} < {limits.min_feature_correlation}"
        )
    worst = max(delta_auroc.items(), key=lambda kv: kv[1], default=None)
    if worst is not None and not worst[1] <= limits.max_delta_auroc:
        failures.append(f"ΔAUROC {worst[0]} {worst[1]:.4f} > {limits.max_delta_auroc}")
    return failures


def compare(
    *,
    runtime: str,
    precision: str,
    weights_sha256: str,
    reference_probability: npt.NDArray[Any],
    candidate_probability: npt.NDArray[Any],
    thresholds: npt.NDArray[Any],
    reference_cams: npt.NDArray[Any] | None,
    candidate_cams: npt.NDArray[Any] | None,
    reference_features: npt.NDArray[Any],
    candidate_features: npt.NDArray[Any],
    findings: Sequence[str],
    labels: Mapping[str, npt.NDArray[np.bool_]] | None = None,
    limits: GateLimits | None = None,
) -> GateReport:
    """Judge a candidate against fp32. Probabilities [N,K]; CAMs [N,K,h,w] (None: a model
    without CAMs); features [N,C];
    ``labels``: finding → [N] ground truth, for ΔAUROC."""
    limits = limits or GateLimits()
    ref_p = np.asarray(reference_probability, np.float64)
    cand_p = np.asarray(candidate_probability, np.float64)
    if ref_p.shape != cand_p.shape or ref_p.ndim != 2 or ref_p.shape[1] != len(findings):
        raise ValueError(f"probability shapes {ref_p.shape} / {cand_p.shape} do not match")
    n, k = ref_p.shape
    max_dp = float(np.abs(ref_p - cand_p).max())
    thr = np.asarray(thresholds, np.float64)[None, :]
    agreement = float(((ref_p >= thr) == (cand_p >= thr)).mean())
    cams_r = (
        None
        if reference_cams is None or candidate_cams is None
        else _row_correlation(
            np.asarray(reference_cams, np.float64).reshape(n * k, -1),
            np.asarray(candidate_cams, np.float64).reshape(n * k, -1),
        )
    )
    feats_r = _row_correlation(
        np.asarray(reference_features, np.float64), np.asarray(candidate_features, np.float64)
    )
    delta_auroc, skipped = _delta_auroc(ref_p, cand_p, findings, labels)
    failures = _failures(limits, max_dp, agreement, cams_r, feats_r, delta_auroc)
    return GateReport(
        runtime=runtime,
        precision=precision,
        weights_sha256=weights_sha256,
        images=n,
        max_abs_delta_probability=max_dp,
        flag_agreement=agreement,
        cam_correlation_min=None if cams_r is None else float(cams_r.min()),
        cam_correlation_mean=None if cams_r is None else float(cams_r.mean()),
        feature_correlation_min=float(feats_r.min()),
        delta_auroc=delta_auroc,
        auroc_skipped=skipped,
        failures=failures,
        limits=limits,
    )
