"""The CLIP image tower's serving session for a (runtime, precision), behind the same gate.

fp32 ONNX Runtime is the default and the reference. OpenVINO fp32 must match torch like it;
bf16 and int8 graphs are judged against fp32 on the gate images by
:func:`models.precision_gate.compare`: the zero-shot tag scores stand in for probabilities
(flags at 0.5), the embeddings for features (they are what similar-case search compares),
and there are no CAMs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxr_errors import ConfigError
from models.onepass import ort_session
from models.precision_gate import GateReport, compare
from models.reduced import (
    Precision,
    Runtime,
    gated,
    graph_stem,
    openvino_int8_graph,
    openvino_session,
    ort_int8_graph,
)
from models.types import NIH_FINDINGS

__all__ = ["clip_session"]


def _embed(session: Any, x: npt.NDArray[np.float32], batch: int = 16) -> npt.NDArray[np.float32]:
    parts = [
        np.asarray(session.run(None, {"x": x[i : i + batch]})[0]) for i in range(0, len(x), batch)
    ]
    return np.concatenate(parts).astype(np.float32)


def clip_session(
    fp32: Any,
    source: bytes | Path,
    *,
    runtime: Runtime,
    precision: Precision,
    weights_sha256: str,
    num_threads: int | None,
    gate_images: Callable[[], npt.NDArray[np.float32]] | None,
    tag_scores: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]],
) -> tuple[Any, GateReport | None]:
    """(session, gate report) for the image tower; ``fp32`` is its ONNX Runtime fp32 session."""
    if runtime == "onnx" and precision == "fp32":
        return fp32, None
    if runtime == "openvino" and precision == "fp32":
        return openvino_session(source, "fp32", num_threads), None
    if runtime == "onnx" and precision == "bf16":
        raise ConfigError(
            "ONNX Runtime's CPU provider has no bf16 kernels on x86: use "
            "CXR_CLIP_BACKEND=openvino for bf16"
        )
    if not isinstance(source, Path):
        raise ConfigError("reduced precision needs a model cache directory (CXR_MODEL_CACHE_DIR)")
    if gate_images is None:
        raise ConfigError(
            f"CLIP {runtime}/{precision} needs the precision gate's images (CXR_PRECISION_GATE_DIR)"
        )
    graph = _ReducedClip(
        fp32, source, runtime, precision, weights_sha256, num_threads, gate_images, tag_scores
    )
    return gated(
        source,
        runtime,
        precision,
        build=graph.build,
        ready=graph.ready,
        judge=graph.judge,
        weights_sha256=weights_sha256,
    )


@dataclass
class _ReducedClip:
    """A bf16/int8 image tower: how to build it, whether it is built, and its gate."""

    fp32: Any
    source: Path
    runtime: Runtime
    precision: Precision
    weights_sha256: str
    num_threads: int | None
    gate_images: Callable[[], npt.NDArray[np.float32]]
    tag_scores: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]
    _images: npt.NDArray[np.float32] | None = None

    @property
    def stem(self) -> Path:
        return graph_stem(self.source, self.runtime, self.precision)

    def images(self) -> npt.NDArray[np.float32]:
        if self._images is None:
            self._images = np.ascontiguousarray(self.gate_images(), np.float32)
        return self._images

    def calibration(self) -> list[npt.NDArray[np.float32]]:
        x = self.images()[::2]
        return [x[i : i + 8] for i in range(0, len(x), 8)]

    def build(self) -> Any:
        if self.precision == "bf16":
            return openvino_session(self.source, "bf16", self.num_threads)
        if self.runtime == "openvino":
            xml = self.stem.with_suffix(".xml")
            if not xml.is_file():
                openvino_int8_graph(self.source, self.calibration(), self.stem)
            return openvino_session(xml, "int8", self.num_threads)
        onnx = self.stem.with_suffix(".onnx")
        if not onnx.is_file():
            ort_int8_graph(self.source, self.calibration(), self.stem)
        return ort_session(onnx, self.num_threads)

    def ready(self) -> bool:
        if self.precision == "bf16":
            return self.source.is_file()
        return self.stem.with_suffix(".xml" if self.runtime == "openvino" else ".onnx").is_file()

    def judge(self, session: Any) -> GateReport:
        x = self.images()
        ref, cand = _embed(self.fp32, x), _embed(session, x)
        return compare(
            runtime=self.runtime,
            precision=self.precision,
            weights_sha256=self.weights_sha256,
            reference_probability=self.tag_scores(ref),
            candidate_probability=self.tag_scores(cand),
            thresholds=np.full(len(NIH_FINDINGS), 0.5),
            reference_cams=None,
            candidate_cams=None,
            reference_features=ref,
            candidate_features=cand,
            findings=NIH_FINDINGS,
        )
