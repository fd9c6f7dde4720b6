"""The CLIP image tower's serving session for a (runtime, precision), behind the same gate.

fp32 ONNX Runtime is the default and the reference. OpenVINO fp32 must match torch like it;
bf16 and int8 graphs are judged against fp32 on the gate images by
:func:`models.precision_gate.compare`: the zero-shot tag scores stand in for probabilities
(flags at 0.5), the embeddings for features (they are what similar-case search compares),
and there are no CAMs.
"""

from __future__ import annotations

from collections.abc import Callable
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
    stem = graph_stem(source, runtime, precision)
    cached: list[npt.NDArray[np.float32]] = []

    def images() -> npt.NDArray[np.float32]:
        if not cached:
            cached.append(np.ascontiguousarray(gate_images(), np.float32))
        return cached[0]

    def calibration() -> list[npt.NDArray[np.float32]]:
        x = images()[::2]
        return [x[i : i + 8] for i in range(0, len(x), 8)]

    def build() -> Any:
        if precision == "bf16":
            return openvino_session(source, "bf16", num_threads)
        if runtime == "openvino":
            xml = stem.with_suffix(".xml")
            if not xml.is_file():
                openvino_int8_graph(source, calibration(), stem)
            return openvino_session(xml, "int8", num_threads)
        onnx = stem.with_suffix(".onnx")
        if not onnx.is_file():
            ort_int8_graph(source, calibration(), stem)
        return ort_session(onnx, num_threads)

    def ready() -> bool:
        if precision == "bf16":
            return source.is_file()
        return stem.with_suffix(".xml" if runtime == "openvino" else ".onnx").is_file()

    def judge(session: Any) -> GateReport:
        x = images()
        ref, cand = _embed(fp32, x), _embed(session, x)
        return compare(
            runtime=runtime,
            precision=precision,
            weights_sha256=weights_sha256,
            reference_probability=tag_scores(ref),
            candidate_probability=tag_scores(cand),
            thresholds=np.full(len(NIH_FINDINGS), 0.5),
            reference_cams=None,
            candidate_cams=None,
            reference_features=ref,
            candidate_features=cand,
            findings=NIH_FINDINGS,
        )

    return gated(
        source,
        runtime,
        precision,
        build=build,
        ready=ready,
        judge=judge,
        weights_sha256=weights_sha256,
    )
