"""Per-class temperature scaling with bias, its uncertainty, and the calibration file.

For finding k the calibrated logit is ``z = logit / T_k + b_k`` (written
``scale_k = 1/T_k``). The two numbers are the MAP estimate of a one-feature
logistic regression of the labels on the model's logit, with a weak Gaussian
prior centred on "no change" (scale 1, bias 0) so that a class with few or no
positives in a small local set stays finite. The inverse Hessian at the
optimum (Laplace approximation) is kept as the fit's 2×2 covariance; it feeds
the confidence band (``models.classifier``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxr_errors import ConfigError, InputError
from models.types import NIH_FINDINGS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Calibration",
    "ClassFit",
    "brier_score",
    "expected_calibration_error",
    "fit_calibration",
    "sigmoid",
]

FORMAT = "cxr-fhir-calibration"
FORMAT_VERSION = 1
_PRIOR_STD = 3.0
"""std of the Gaussian prior on (scale, bias): weak, only keeps tiny classes finite"""

FloatArray = npt.NDArray[np.float64]


def sigmoid(z: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(z, dtype=np.float64)
    out: FloatArray = np.exp(-np.logaddexp(0.0, -arr))
    return out


def expected_calibration_error(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 10
) -> float:
    """ECE with equal-width bins: Σ_b (n_b / n) · |mean(p_b) − mean(y_b)|."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.sum() / p.size * abs(p[mask].mean() - y[mask].mean())
    return float(total)


def brier_score(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


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
    ece_after: float = float("nan")
    brier_before: float = float("nan")
    brier_after: float = float("nan")

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

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created": self.created,
            "weights_name": self.weights_name,
            "weights_sha256": self.weights_sha256,
            "method": "per-class temperature scaling with bias; MAP with N((1,0), 3^2) prior; "
            "Laplace covariance",
            "n_images": self.n_images,
            "meta": self.meta,
            "classes": {
                name: {
                    "temperature": fit.temperature,
                    "scale": fit.scale,
                    "bias": fit.bias,
                    "cov": [list(row) for row in fit.cov],
                    "n": fit.n,
                    "n_positive": fit.n_positive,
                    "ece_before": fit.ece_before,
                    "ece_after": fit.ece_after,
                    "brier_before": fit.brier_before,
                    "brier_after": fit.brier_after,
                }
                for name, fit in self.classes.items()
            },
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
                f"(format={doc.get('format')!r}, version={doc.get('format_version')!r})"
            )
        try:
            classes = {
                name: ClassFit(
                    scale=float(c["scale"]),
                    bias=float(c["bias"]),
                    cov=(
                        (float(c["cov"][0][0]), float(c["cov"][0][1])),
                        (float(c["cov"][1][0]), float(c["cov"][1][1])),
                    ),
                    n=int(c.get("n", 0)),
                    n_positive=int(c.get("n_positive", 0)),
                    ece_before=float(c.get("ece_before", "nan")),
                    ece_after=float(c.get("ece_after", "nan")),
                    brier_before=float(c.get("brier_before", "nan")),
                    brier_after=float(c.get("brier_after", "nan")),
                )
                for name, c in doc["classes"].items()
            }
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"calibration file {path} is malformed: {exc}") from exc
        unknown = set(classes) - set(NIH_FINDINGS)
        if unknown:
            raise ConfigError(f"calibration file {path} names unknown findings {sorted(unknown)}")
        return cls(
            classes=classes,
            weights_name=str(doc.get("weights_name", "")),
            weights_sha256=str(doc.get("weights_sha256", "")),
            created=str(doc.get("created", "")),
            n_images=int(doc.get("n_images", 0)),
            version=str(doc["version"]),
            meta=dict(doc.get("meta", {})),
        )


def _fit_one(x: FloatArray, y: FloatArray, iterations: int = 100) -> tuple[FloatArray, FloatArray]:
    """MAP (scale, bias) by Newton's method with backtracking; returns (theta, covariance)."""
    prior_mean = np.array([1.0, 0.0])
    prior_prec = np.eye(2) / _PRIOR_STD**2
    design = np.stack([x, np.ones_like(x)], axis=1)

    def objective(theta: FloatArray) -> float:
        z = design @ theta
        nll = np.sum(np.logaddexp(0.0, z) - y * z)
        d = theta - prior_mean
        return float(nll + 0.5 * d @ prior_prec @ d)

    theta = prior_mean.copy()
    current = objective(theta)
    hess = prior_prec
    for _ in range(iterations):
        p = sigmoid(design @ theta)
        grad = design.T @ (p - y) + prior_prec @ (theta - prior_mean)
        hess = design.T @ (design * (p * (1 - p))[:, None]) + prior_prec
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            candidate = theta - t * step
            value = objective(candidate)
            if value <= current:
                break
            t /= 2
        else:
            break
        theta, improvement = candidate, current - value
        current = value
        if improvement < 1e-10:
            break
    p = sigmoid(design @ theta)
    hess = design.T @ (design * (p * (1 - p))[:, None]) + prior_prec
    cov: FloatArray = np.linalg.inv(hess).astype(np.float64)
    return theta.astype(np.float64), cov


def fit_calibration(
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    weights_name: str = "",
    weights_sha256: str = "",
    meta: dict[str, Any] | None = None,
) -> Calibration:
    """Fit every finding on logits [N, 14] and 0/1 labels [N, 14] (``NIH_FINDINGS`` order)."""
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
    classes: dict[str, ClassFit] = {}
    for k, name in enumerate(NIH_FINDINGS):
        x, y = x_all[:, k], y_all[:, k]
        theta, cov = _fit_one(x, y)
        before, after = sigmoid(x), sigmoid(theta[0] * x + theta[1])
        classes[name] = ClassFit(
            scale=float(theta[0]),
            bias=float(theta[1]),
            cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
            n=int(x.size),
            n_positive=int(y.sum()),
            ece_before=expected_calibration_error(before, y),
            ece_after=expected_calibration_error(after, y),
            brier_before=brier_score(before, y),
            brier_after=brier_score(after, y),
        )
    digest = hashlib.sha256(
        json.dumps(
            {n: [c.scale, c.bias] for n, c in classes.items()} | {"w": weights_sha256},
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
        meta=dict(meta or {}),
    )
