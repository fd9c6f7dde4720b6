"""The classifier: one batched pass → :class:`~models.types.ImageAnalysis` per image.

Confidence band (image-level uncertainty), per finding k::

    z        = scale_k · logit_k + bias_k                    calibrated logit
    var_tta  = scale_k² · var(logit_k over the TTA views)     augmentation spread
    var_fit  = [logit_k, 1] · Σ_k · [logit_k, 1]ᵀ             calibration fit (Laplace)
    band     = sigmoid(z ∓ 1.96 · sqrt(var_tta + var_fit))

The test-time augmentation views (a 7 % zoom and a zoom with a shift, made from
the already preprocessed 224² tensor) are stacked into the *same* batch, so
there is still one pass; it costs 3× the compute, and ``tta=False``
(``CXR_TTA=false``) turns it off for throughput, leaving only the fit term.
The reported logit, scores and CAMs always come from the unaugmented view, so
``mean(CAM_k) + bias_k == logit_k`` holds exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from cxr_errors import ConfigError, ModelError
from models.calibration import Calibration, sigmoid
from models.onepass import OnePassNet, PassBackend, PassOutput, TorchBackend, release_module
from models.precision_gate import GateReport, compare
from models.preprocess import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodedImage,
    ImageSource,
    Preprocess,
)
from models.reduced import Precision, Requested, Runtime, auto_precision
from models.registry import BackendName, LoadedWeights
from models.serving import GateData, build_pass_backend
from models.types import NIH_FINDINGS, FindingScore, ImageAnalysis

__all__ = ["BAND_Z", "TTA_VIEWS", "Classifier", "tta_views"]

log = logging.getLogger(__name__)

#: two-sided 95 % normal quantile
BAND_Z = 1.959964
#: views per image with TTA on (the original + 2 augmentations)
TTA_VIEWS = 3


def tta_views(x: torch.Tensor) -> torch.Tensor:
    """[B,1,S,S] → [3B,1,S,S]: original, 7 % centre zoom, 7 % zoom shifted 8 px.

    No flips: a mirrored chest moves the heart to the wrong side, which is not a
    nuisance variation for Cardiomegaly.
    """
    size = x.shape[-1]
    crop = round(size * 0.93)
    off = (size - crop) // 2
    centre = x[..., off : off + crop, off : off + crop]
    shifted = x[..., size - crop :, size - crop :]
    views = [
        F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False)
        for v in (centre, shifted)
    ]
    return torch.cat([x, *views], dim=0)


class Classifier:
    """DenseNet weights + their preprocessing + calibration, behind one ``analyze`` call.

    Build it with :func:`models.factory.load_classifier`.
    """

    def __init__(
        self,
        loaded: LoadedWeights,
        *,
        backend: BackendName = "onnx",
        onnx_cache_dir: Path | None = None,
        calibration: Calibration | None = None,
        tta: bool = True,
        num_threads: int | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        precision: Requested = "fp32",
        gate_images: Sequence[Path] = (),
        gate_labels: Mapping[str, npt.NDArray[np.bool_]] | None = None,
    ) -> None:
        """``precision`` other than fp32 serves a graph only after the precision gate passed
        on ``gate_images`` (with ``gate_labels``, finding → [N] truth, ΔAUROC is gated too);
        ``auto``: bf16 where that holds, else fp32 (``self.precision`` is what serves)."""
        self.loaded = loaded
        self.spec = loaded.spec
        self.model = loaded.model
        self.untrained = loaded.untrained
        self.weights_sha256 = loaded.sha256
        self.preprocess = Preprocess(
            loaded.spec.preprocessing,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
        )
        self.tta = tta
        self.net = OnePassNet(loaded.model).eval()
        self.calibration = calibration = _pinned(calibration, loaded)
        self._index = np.array(self.spec.finding_index())
        self._extra = self.spec.extra_index()
        bias = self.net.classifier.bias
        self._bias = (
            bias.detach().numpy()[self._index].astype(np.float32)
            if bias is not None
            else np.zeros(len(NIH_FINDINGS), np.float32)
        )
        self.thresholds = self._thresholds()
        self.band_kinds = self._band_kinds()
        self.calibrated_findings = tuple(
            f
            for f in NIH_FINDINGS
            if (c := calibration.classes.get(f)) is not None and c.calibrated
        )
        self._gate_labels = gate_labels
        self.precision: Precision = "fp32"
        """the arithmetic that serves (``auto`` resolved)"""
        self.backend = self._backend(backend, precision, onnx_cache_dir, num_threads, gate_images)

    def _backend(
        self,
        backend: BackendName,
        precision: Requested,
        cache_dir: Path | None,
        num_threads: int | None,
        gate_images: Sequence[Path],
    ) -> PassBackend:
        if backend == "torch":
            if precision not in ("fp32", "auto"):
                raise ConfigError("the torch backend is the fp32 reference: use onnx or openvino")
            return TorchBackend(self.net)
        if backend not in ("onnx", "openvino"):
            raise ConfigError(
                f"unknown model backend {backend!r}: use 'onnx', 'openvino' or 'torch'"
            )
        gate = GateData(lambda: self.prepare(list(gate_images)).numpy(), self._judge)

        def build(runtime: Runtime, served: Precision) -> PassBackend:
            return build_pass_backend(
                self.net,
                runtime=runtime,
                precision=served,
                input_size=self.spec.input_size,
                weights_sha256=self.weights_sha256,
                cache_dir=cache_dir,
                num_threads=num_threads,
                gate=gate if gate_images else None,
            )

        if precision == "auto":
            served, _, self.precision = auto_precision("DenseNet", backend, build)
            return served
        self.precision = precision
        return build(backend, precision)

    def release_torch(self) -> int:
        """Free the torch DenseNet once a graph serves (the lean worker); bytes freed.

        The torch backend *is* the module: nothing is released there."""
        if isinstance(self.backend, TorchBackend):
            return 0
        return release_module(self.net)

    @property
    def gate_report(self) -> GateReport | None:
        """The precision gate's report for the serving graph (None for fp32)."""
        report = getattr(self.backend, "gate", None)
        return report if isinstance(report, GateReport) else None

    def _judge(
        self, runtime: str, precision: str, reference: PassOutput, candidate: PassOutput
    ) -> GateReport:
        def probability(out: PassOutput) -> npt.NDArray[np.float64]:
            z, _ = self.calibration.apply(out.logits[:, self._index].astype(np.float64))
            return sigmoid(z)

        return compare(
            runtime=runtime,
            precision=precision,
            weights_sha256=self.weights_sha256,
            reference_probability=probability(reference),
            candidate_probability=probability(candidate),
            thresholds=self.thresholds,
            reference_cams=reference.cams[:, self._index],
            candidate_cams=candidate.cams[:, self._index],
            reference_features=reference.features,
            candidate_features=candidate.features,
            findings=NIH_FINDINGS,
            labels=self._gate_labels,
        )

    # ------------------------------------------------------------ identity

    @property
    def model_version(self) -> str:
        base = self.loaded.model_version
        return base if self.calibration.is_identity else f"{base}+{self.calibration.version}"

    def _thresholds(self) -> npt.NDArray[np.float64]:
        """Operating thresholds on calibrated_probability.

        A threshold the calibration chose (target sensitivity or Youden) wins; otherwise
        torchxrayvision's op_threshs, points on sigmoid(logit), mapped through the
        calibration (monotone, so every decision stays the same). Untrained weights have no
        operating points: 0.5.
        """
        chosen = self.calibration.thresholds()
        op = self.spec.op_threshs
        if self.untrained or op is None:
            base = np.full(len(NIH_FINDINGS), 0.5)
        else:
            p = np.clip(np.array([op[i] for i in self._index], dtype=np.float64), 1e-7, 1 - 1e-7)
            z, _ = self.calibration.apply(np.log(p) - np.log1p(-p))
            base = sigmoid(z)
        return np.array([chosen.get(f, base[k]) for k, f in enumerate(NIH_FINDINGS)])

    def _band_kinds(self) -> list[str]:
        kinds = []
        for f in NIH_FINDINGS:
            fit = self.calibration.classes.get(f)
            calibrated = fit is not None and fit.calibrated
            if calibrated:
                kinds.append("calibration+tta" if self.tta else "calibration")
            else:
                kinds.append("tta-spread" if self.tta else "none")
        return kinds

    # ------------------------------------------------------------ running

    def run(self, x: torch.Tensor | npt.NDArray[np.float32]) -> PassOutput:
        """The raw pass on a [B,1,S,S] batch: all model outputs, no TTA, no mapping."""
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        return self.backend.run(np.ascontiguousarray(arr, dtype=np.float32))

    def logits(self, x: torch.Tensor) -> npt.NDArray[np.float32]:
        """Logits [B,14] in ``NIH_FINDINGS`` order (no TTA)."""
        return self.run(x).logits[:, self._index]

    def prepare(self, images: Sequence[DecodedImage | ImageSource | torch.Tensor]) -> torch.Tensor:
        tensors = [img if isinstance(img, torch.Tensor) else self.preprocess(img) for img in images]
        return torch.stack(tensors)

    def analyze(
        self,
        images: Sequence[DecodedImage | ImageSource | torch.Tensor],
        *,
        batch_size: int = 16,
    ) -> list[ImageAnalysis]:
        """Preprocess and analyse images (paths, bytes, decoded images or [1,S,S] tensors)."""
        results: list[ImageAnalysis] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            results.extend(self.analyze_batch(self.prepare(chunk)))
        return results

    def analyze_batch(self, x: torch.Tensor) -> list[ImageAnalysis]:
        """One pass over a preprocessed [B,1,S,S] batch (TTA views stacked into it)."""
        size = self.spec.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, size, size):
            raise ModelError(f"expected a [B,1,{size},{size}] batch, got {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return []
        out = self.run(tta_views(x) if self.tta else x)
        logits_all = out.logits[:, self._index].astype(np.float64)
        logits = logits_all[:n]
        z, var_fit = self.calibration.apply(logits)
        if self.tta:
            spread = logits_all.reshape(TTA_VIEWS, n, -1).std(axis=0, ddof=1)
            scale, _, _ = self.calibration.arrays()
            var = var_fit + (scale * spread) ** 2
        else:
            var = var_fit
        half = BAND_Z * np.sqrt(var)
        calibrated, low, high = sigmoid(z), sigmoid(z - half), sigmoid(z + half)
        scores = sigmoid(logits)
        cams = out.cams[:n][:, self._index]
        version = self.model_version
        results = []
        for i in range(n):
            findings = tuple(
                FindingScore(
                    finding=name,
                    logit=float(out.logits[i, self._index[k]]),
                    sigmoid_score=float(scores[i, k]),
                    calibrated_probability=float(calibrated[i, k]),
                    band_low=float(low[i, k]),
                    band_high=float(high[i, k]),
                    threshold=float(self.thresholds[k]),
                    calibrated=name in self.calibrated_findings,
                    band_kind=self.band_kinds[k],
                )
                for k, name in enumerate(NIH_FINDINGS)
            )
            extra = {label: float(sigmoid(out.logits[i, j])) for label, j in self._extra}
            results.append(
                ImageAnalysis(
                    findings=findings,
                    cams=np.ascontiguousarray(cams[i], dtype=np.float32),
                    cam_bias=self._bias.copy(),
                    features=np.ascontiguousarray(out.features[i], dtype=np.float32),
                    model_version=version,
                    untrained=self.untrained,
                    extra_findings=extra,
                    weights_sha256=self.weights_sha256,
                )
            )
        return results


def _pinned(calibration: Calibration | None, loaded: LoadedWeights) -> Calibration:
    """``calibration`` (identity when None), refused when fitted for other weights."""
    calibration = calibration or Calibration.identity()
    if calibration.weights_sha256 and calibration.weights_sha256 != loaded.sha256:
        raise ConfigError(
            f"calibration {calibration.version} was fitted for weights "
            f"{calibration.weights_name}@{calibration.weights_sha256[:12]}, "
            f"not the loaded {loaded.model_version}; re-run `cxr calibrate`"
        )
    return calibration
