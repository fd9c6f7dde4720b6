"""Per-class temperature scaling with bias, its uncertainty, operating thresholds, the file.

For finding k the calibrated logit is ``z = logit / T_k + b_k`` (written ``scale_k = 1/T_k``).
The fit is over ``(log T_k, b_k)``, so the temperature is positive by construction: a
negative temperature would invert every decision (seen in ~9 % of unconstrained fits on 30
images). It is the MAP estimate of a one-feature logistic regression of the labels on the
logit with a weak Gaussian prior centred on "no change" (log T ~ N(0, 1), b ~ N(0, 3²)); the
inverse Hessian at the optimum (Laplace approximation), carried to (scale, bias) by the delta
method, is the fit's 2×2 covariance and feeds the confidence band (``models.classifier``).

A finding with fewer than ``MIN_POSITIVES`` positives (or negatives) in the fitting split is
left uncalibrated (identity) and says so. Operating thresholds are chosen per finding on the
fitting split — for a target sensitivity (default 0.90) or by Youden's J — and stored with the
sensitivity and specificity they reach on the held-out split.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxr_errors import ConfigError, InputError
from models.evaluation import (
    brier_score,
    confusion_at,
    expected_calibration_error,
    threshold_for_sensitivity,
    youden_threshold,
)
from models.types import NIH_FINDINGS

__all__ = [
    "DEFAULT_TARGET_SENSITIVITY",
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_POSITIVES",
    "Calibration",
    "ClassFit",
    "brier_score",
    "expected_calibration_error",
    "fit_calibration",
    "sigmoid",
    "split_indices",
]

FORMAT = "cxr-fhir-calibration"
FORMAT_VERSION = 2
_PRIOR_STD = (1.0, 3.0)
"""std of the Gaussian prior on (log temperature, bias): weak, only keeps tiny classes finite"""
#: fewer positives (or negatives) than this in the fitting split: the finding stays uncalibrated
MIN_POSITIVES = 10
DEFAULT_TARGET_SENSITIVITY = 0.90
#: share of the labelled images held out to measure ECE and the thresholds
DEFAULT_HOLDOUT = 0.3

FloatArray = npt.NDArray[np.float64]


def sigmoid(z: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(z, dtype=np.float64)
    out: FloatArray = np.exp(-np.logaddexp(0.0, -arr))
    return out


@dataclass(frozen=True)
class ClassFit:
    """One finding's fit and what it did on the fitting data."""

    scale: float
    """1 / temperature"""
    bias: float
    cov: tuple[tuple[float, float], tuple[float, float]]
    """Laplace covariance of (scale, bias)"""
    n: int = 0
    n_positive: int = 0
    ece_before: float = float("nan")
    """on the held-out split, before (identity) and after the fit"""
    ece_after: float = float("nan")
    brier_before: float = float("nan")
    brier_after: float = float("nan")
    calibrated: bool = False
    """False: identity (too few positives, or no fit); ``note`` says why"""
    note: str = ""
    threshold: float | None = None
    """operating threshold on the calibrated probability; None = the weights' own"""
    threshold_rule: str = ""
    validation_sensitivity: float = float("nan")
    validation_specificity: float = float("nan")
    n_validation: int = 0

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale if self.scale != 0 else math.inf


_IDENTITY = ClassFit(scale=1.0, bias=0.0, cov=((0.0, 0.0), (0.0, 0.0)))


@dataclass(frozen=True)
class Calibration:
    """Per-finding temperature + bias for one set of weights (identity when absent)."""

    classes: dict[str, ClassFit]
    weights_name: str = ""
    weights_sha256: str = ""
    created: str = ""
    n_images: int = 0
    version: str = "none"
    """content hash of the fit; 'none' for the identity"""
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def identity(cls) -> Calibration:
        return cls(classes={f: _IDENTITY for f in NIH_FINDINGS})

    @property
    def is_identity(self) -> bool:
        return self.version == "none"

    def arrays(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(scale[14], bias[14], cov[14,2,2]) in ``NIH_FINDINGS`` order."""
        fits = [self.classes.get(f, _IDENTITY) for f in NIH_FINDINGS]
        return (
            np.array([c.scale for c in fits]),
            np.array([c.bias for c in fits]),
            np.array([c.cov for c in fits], dtype=np.float64),
        )

    def apply(self, logits: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(calibrated logit, its variance from the fit) for logits [..., 14]."""
        x = np.asarray(logits, dtype=np.float64)
        scale, bias, cov = self.arrays()
        z = scale * x + bias
        var: FloatArray = np.maximum(
            cov[:, 0, 0] * x * x + 2.0 * cov[:, 0, 1] * x + cov[:, 1, 1], 0.0
        )
        return z.astype(np.float64), var

    # ------------------------------------------------------------ file

    def thresholds(self) -> dict[str, float]:
        """The per-finding operating thresholds this calibration chose (on its probability)."""
        return {n: c.threshold for n, c in self.classes.items() if c.threshold is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created": self.created,
            "weights_name": self.weights_name,
            "weights_sha256": self.weights_sha256,
            "method": "per-class temperature scaling with bias, fitted as (log T, b): MAP with "
            "N(0, 1) on log T and N(0, 3^2) on b; Laplace covariance of (1/T, b); ECE (15 bins) "
            "and thresholds' sensitivity/specificity on a held-out split",
            "n_images": self.n_images,
            "meta": self.meta,
            "classes": {name: _class_json(fit) for name, fit in self.classes.items()},
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, allow_nan=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"calibration file {path} does not exist") from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"calibration file {path} is not readable JSON: {exc}") from exc
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"calibration file {path} is not a {FORMAT} v{FORMAT_VERSION} file "
                f"(format={doc.get('format')!r}, version={doc.get('format_version')!r}); "
                "re-run `cxr calibrate`"
            )
        if not str(doc.get("weights_sha256", "")):
            raise ConfigError(
                f"calibration file {path} does not record the sha256 of the weights it was "
                "fitted for, so it cannot be checked against the loaded weights; re-run "
                "`cxr calibrate`"
            )
        try:
            classes = {name: _class_from_json(c) for name, c in doc["classes"].items()}
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"calibration file {path} is malformed: {exc}") from exc
        unknown = set(classes) - set(NIH_FINDINGS)
        if unknown:
            raise ConfigError(f"calibration file {path} names unknown findings {sorted(unknown)}")
        bad = [n for n, c in classes.items() if not c.scale > 0 or not math.isfinite(c.scale)]
        if bad:
            raise ConfigError(f"calibration file {path} has non-positive temperatures for {bad}")
        return cls(
            classes=classes,
            weights_name=str(doc.get("weights_name", "")),
            weights_sha256=str(doc.get("weights_sha256", "")),
            created=str(doc.get("created", "")),
            n_images=int(doc.get("n_images", 0)),
            version=str(doc["version"]),
            meta=dict(doc.get("meta", {})),
        )


_FLOAT_FIELDS = ("ece_before", "ece_after", "brier_before", "brier_after",
                 "validation_sensitivity", "validation_specificity")  # fmt: skip


def _class_json(fit: ClassFit) -> dict[str, Any]:
    return {
        "calibrated": fit.calibrated,
        "note": fit.note,
        "temperature": fit.temperature,
        "scale": fit.scale,
        "bias": fit.bias,
        "cov": [list(row) for row in fit.cov],
        "n": fit.n,
        "n_positive": fit.n_positive,
        "threshold": fit.threshold,
        "threshold_rule": fit.threshold_rule,
        "n_validation": fit.n_validation,
        **{name: getattr(fit, name) for name in _FLOAT_FIELDS},
    }


def _class_from_json(c: dict[str, Any]) -> ClassFit:
    threshold = c.get("threshold")
    return ClassFit(
        scale=float(c["scale"]),
        bias=float(c["bias"]),
        cov=(
            (float(c["cov"][0][0]), float(c["cov"][0][1])),
            (float(c["cov"][1][0]), float(c["cov"][1][1])),
        ),
        n=int(c.get("n", 0)),
        n_positive=int(c.get("n_positive", 0)),
        calibrated=bool(c.get("calibrated", False)),
        note=str(c.get("note", "")),
        threshold=None if threshold is None else float(threshold),
        threshold_rule=str(c.get("threshold_rule", "")),
        n_validation=int(c.get("n_validation", 0)),
        **{name: float(c.get(name, "nan")) for name in _FLOAT_FIELDS},
    )


def _fit_one(x: FloatArray, y: FloatArray, iterations: int = 100) -> tuple[FloatArray, FloatArray]:
    """MAP (scale, bias) with scale = exp(−log T) > 0; returns (theta, covariance of theta).

    Newton's method on (log T, b) with backtracking; where the Hessian is not positive
    definite (far from the optimum, log T is not convex) the step falls back to the gradient.
    """
    prior_std = np.array(_PRIOR_STD)
    design = np.stack([x, np.ones_like(x)], axis=1)

    def unpack(eta: FloatArray) -> FloatArray:
        return np.array([math.exp(-eta[0]), eta[1]])

    def objective(eta: FloatArray) -> float:
        z = design @ unpack(eta)
        nll = np.sum(np.logaddexp(0.0, z) - y * z)
        return float(nll + 0.5 * np.sum((eta / prior_std) ** 2))

    def grad_hess(eta: FloatArray) -> tuple[FloatArray, FloatArray]:
        a = math.exp(-eta[0])
        z = design @ unpack(eta)
        p, w = sigmoid(z), sigmoid(z) * (1 - sigmoid(z))
        r = p - y
        # d z / d eta = (-a x, 1); d2 z / d eta0^2 = a x
        g = np.array([np.sum(r * -a * x), np.sum(r)]) + eta / prior_std**2
        h00 = np.sum(w * (a * x) ** 2) + np.sum(r * a * x)
        h01 = np.sum(w * -a * x)
        h11 = np.sum(w)
        hess = np.array([[h00, h01], [h01, h11]]) + np.diag(1.0 / prior_std**2)
        return g, hess

    eta = np.zeros(2)
    current = objective(eta)
    for _ in range(iterations):
        g, hess = grad_hess(eta)
        try:
            np.linalg.cholesky(hess)
            step = np.linalg.solve(hess, g)
        except np.linalg.LinAlgError:
            step = g / max(1.0, float(np.abs(g).max()))
        t, moved = 1.0, False
        while t > 1e-8:
            candidate = eta - t * step
            value = objective(candidate)
            if value <= current:
                moved = True
                break
            t /= 2
        if not moved:
            break
        eta, improvement, current = candidate, current - value, value
        if improvement < 1e-10:
            break
    _, hess = grad_hess(eta)
    try:
        cov_eta = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        cov_eta = np.diag(prior_std**2)
    theta = unpack(eta)
    jac = np.array([[-theta[0], 0.0], [0.0, 1.0]])  # d(scale, b) / d(log T, b)
    cov: FloatArray = (jac @ cov_eta @ jac.T).astype(np.float64)
    return theta.astype(np.float64), cov


def split_indices(
    n: int, holdout: float, seed: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(fit, held-out) image indices, seeded; the held-out split gets ``holdout`` of them."""
    order = np.random.default_rng(seed).permutation(n)
    n_out = min(n - 2, max(1, round(holdout * n))) if n >= 4 else 0
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def _threshold(
    x: FloatArray, y: FloatArray, theta: FloatArray, target: float | None
) -> tuple[float, str]:
    p = sigmoid(theta[0] * x + theta[1])
    if target is None:
        return youden_threshold(y, p), "youden"
    return threshold_for_sensitivity(y, p, target), f"sensitivity {target:g}"


def _fit_class(
    x: FloatArray,
    y: FloatArray,
    fit_idx: npt.NDArray[np.int64],
    val_idx: npt.NDArray[np.int64],
    target: float | None,
    min_positives: int,
) -> ClassFit:
    xf, yf, xv, yv = x[fit_idx], y[fit_idx], x[val_idx], y[val_idx]
    positives, negatives = int(yf.sum()), int(yf.size - yf.sum())
    if min(positives, negatives) < min_positives:
        fit = replace(_IDENTITY, n=int(xf.size), n_positive=positives)
        return replace(
            fit,
            note=f"left uncalibrated: {positives} positives and {negatives} negatives in the "
            f"fitting split, fewer than {min_positives}",
        )
    theta, cov = _fit_one(xf, yf)
    threshold, rule = _threshold(xf, yf, theta, target)
    before, after = sigmoid(xv), sigmoid(theta[0] * xv + theta[1])
    op = confusion_at(yv, after, threshold) if val_idx.size else None
    return ClassFit(
        scale=float(theta[0]),
        bias=float(theta[1]),
        cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
        n=int(xf.size),
        n_positive=positives,
        ece_before=expected_calibration_error(before, yv) if val_idx.size else math.nan,
        ece_after=expected_calibration_error(after, yv) if val_idx.size else math.nan,
        brier_before=brier_score(before, yv) if val_idx.size else math.nan,
        brier_after=brier_score(after, yv) if val_idx.size else math.nan,
        calibrated=True,
        threshold=threshold,
        threshold_rule=rule,
        validation_sensitivity=op.sensitivity if op else math.nan,
        validation_specificity=op.specificity if op else math.nan,
        n_validation=int(val_idx.size),
    )


def fit_calibration(
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    weights_name: str = "",
    weights_sha256: str,
    meta: dict[str, Any] | None = None,
    holdout: float = DEFAULT_HOLDOUT,
    target_sensitivity: float | None = DEFAULT_TARGET_SENSITIVITY,
    min_positives: int = MIN_POSITIVES,
    seed: int = 0,
) -> Calibration:
    """Fit every finding on logits [N, 14] and 0/1 labels [N, 14] (``NIH_FINDINGS`` order).

    ``holdout`` of the images (seeded) are kept out of the fit to measure ECE before/after and
    the thresholds' sensitivity/specificity. ``target_sensitivity`` None picks thresholds by
    Youden's J. ``weights_sha256`` is required: the file is refused for other weights.
    """
    x_all = np.asarray(logits, dtype=np.float64)
    y_all = np.asarray(labels, dtype=np.float64)
    if x_all.ndim != 2 or x_all.shape[1] != len(NIH_FINDINGS) or x_all.shape != y_all.shape:
        raise InputError(
            f"calibration needs logits and labels of shape [N, {len(NIH_FINDINGS)}], "
            f"got {x_all.shape} and {y_all.shape}"
        )
    if x_all.shape[0] < 2:
        raise InputError("calibration needs at least 2 labelled images")
    if not np.isfinite(x_all).all() or not np.isin(y_all, (0.0, 1.0)).all():
        raise InputError("calibration logits must be finite and labels 0 or 1")
    if not weights_sha256:
        raise InputError("calibration needs the sha256 of the weights it is fitted for")
    fit_idx, val_idx = split_indices(x_all.shape[0], holdout, seed)
    classes = {
        name: _fit_class(
            x_all[:, k], y_all[:, k], fit_idx, val_idx, target_sensitivity, min_positives
        )
        for k, name in enumerate(NIH_FINDINGS)
    }
    digest = hashlib.sha256(
        json.dumps(
            {n: [c.scale, c.bias, c.threshold] for n, c in classes.items()} | {"w": weights_sha256},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    return Calibration(
        classes=classes,
        weights_name=weights_name,
        weights_sha256=weights_sha256,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        n_images=int(x_all.shape[0]),
        version=f"cal{FORMAT_VERSION}-{digest}",
        meta=dict(meta or {}) | {"holdout": holdout, "seed": seed, "min_positives": min_positives},
    )
