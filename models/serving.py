"""The DenseNet serving backend for a (runtime, precision): fp32 ONNX Runtime by default.

:func:`build_pass_backend` is what :class:`models.classifier.Classifier` calls. fp32 on ONNX
Runtime is :class:`models.onepass.OnnxBackend` unchanged; OpenVINO fp32 is checked against
torch like it; every bf16/int8 graph goes through the precision gate
(:mod:`models.precision_gate`) against the fp32 graph of the same weights, on the gate images
the caller supplies, and serves only when it passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from cxr_errors import ConfigError, ModelError
from models.onepass import (
    OnePassNet,
    OnnxBackend,
    PassBackend,
    PassOutput,
    TorchBackend,
    onnx_cache_path,
    ort_session,
)
from models.precision_gate import GateReport
from models.reduced import (
    Precision,
    Runtime,
    gated,
    graph_stem,
    openvino_int8_graph,
    openvino_session,
    ort_int8_graph,
)

__all__ = ["GateData", "SessionBackend", "build_pass_backend", "run_batched"]

PREFIX = "densenet-onepass"


class SessionBackend:
    """Any session with ONNX Runtime's ``run(None, {"x": …})`` → (logits, cams, features)."""

    def __init__(self, name: str, session: Any, gate: GateReport | None = None) -> None:
        self.name = name
        self.session = session
        self.gate = gate

    def run(self, x: npt.NDArray[np.float32]) -> PassOutput:
        logits, cams, feats = self.session.run(None, {"x": np.ascontiguousarray(x, np.float32)})
        return PassOutput(np.asarray(logits), np.asarray(cams), np.asarray(feats))


def run_batched(backend: PassBackend, x: npt.NDArray[np.float32], batch: int = 16) -> PassOutput:
    parts = [backend.run(x[i : i + batch]) for i in range(0, len(x), batch)]
    return PassOutput(
        np.concatenate([p.logits for p in parts]),
        np.concatenate([p.cams for p in parts]),
        np.concatenate([p.features for p in parts]),
    )


@dataclass(frozen=True)
class GateData:
    """What the gate runs on: preprocessed images and how to judge two passes over them."""

    images: Callable[[], npt.NDArray[np.float32]]
    """[N,1,S,S] preprocessed gate images (loaded only when a gate must run)"""
    judge: Callable[[str, str, PassOutput, PassOutput], GateReport]
    """(runtime, precision, fp32 output, candidate output) → report"""


def check_against_torch(
    backend: PassBackend, net: OnePassNet, input_size: int, atol: float, where: str
) -> None:
    """One seeded probe through torch and the graph: a wrong graph never serves."""
    gen = torch.Generator().manual_seed(1234)
    probe = (torch.rand(1, 1, input_size, input_size, generator=gen) * 2048.0 - 1024.0).numpy()
    ref = TorchBackend(net).run(probe)
    got = backend.run(probe)
    for name in ("logits", "cams", "features"):
        a, b = getattr(ref, name), getattr(got, name)
        err = float(np.abs(a - b).max()) / max(1.0, float(np.abs(a).max()))
        if err > atol:
            raise ModelError(
                f"{where} disagrees with torch on {name}: scaled max error {err:.2e} > {atol:g}"
            )


def build_pass_backend(
    net: OnePassNet,
    *,
    runtime: Runtime,
    precision: Precision,
    input_size: int,
    weights_sha256: str,
    cache_dir: Path | None,
    num_threads: int | None,
    gate: GateData | None,
) -> PassBackend:
    """The backend for (runtime, precision); reduced precision only behind a passed gate."""
    fp32 = OnnxBackend(
        net,
        input_size=input_size,
        weights_sha256=weights_sha256,
        cache_dir=cache_dir,
        num_threads=num_threads,
    )
    if runtime == "onnx" and precision == "fp32":
        return fp32
    if runtime == "openvino" and precision == "fp32":
        ov = SessionBackend("openvino-fp32", openvino_session(fp32.source, "fp32", num_threads))
        check_against_torch(ov, net, input_size, 1e-4, "OpenVINO fp32 graph")
        return ov
    if runtime == "onnx" and precision == "bf16":
        raise ConfigError(
            "ONNX Runtime's CPU provider has no bf16 kernels on x86: use "
            "CXR_MODEL_BACKEND=openvino for bf16, or int8/fp32 on onnx"
        )
    if cache_dir is None or not isinstance(fp32.source, Path):
        raise ConfigError("reduced precision needs a model cache directory (CXR_MODEL_CACHE_DIR)")
    if gate is None:
        raise ConfigError(
            f"{runtime}/{precision} needs the precision gate's images (CXR_PRECISION_GATE_DIR)"
        )
    graph = onnx_cache_path(cache_dir, PREFIX, weights_sha256)
    return _gated_backend(fp32, graph, runtime, precision, weights_sha256, num_threads, gate)


def _gated_backend(
    fp32: OnnxBackend,
    graph: Path,
    runtime: Runtime,
    precision: Precision,
    weights_sha256: str,
    num_threads: int | None,
    gate: GateData,
) -> SessionBackend:
    stem = graph_stem(graph, runtime, precision)
    images: list[npt.NDArray[np.float32]] = []

    def gate_images() -> npt.NDArray[np.float32]:
        if not images:
            images.append(np.ascontiguousarray(gate.images(), np.float32))
        return images[0]

    def calibration() -> list[npt.NDArray[np.float32]]:
        # every other gate image, in batches of 8: the rest of the gate set is unseen
        x = gate_images()[::2]
        return [x[i : i + 8] for i in range(0, len(x), 8)]

    def build() -> Any:
        if precision == "bf16":
            return openvino_session(graph, "bf16", num_threads)
        if runtime == "openvino":
            xml = stem.with_suffix(".xml")
            if not xml.is_file():
                openvino_int8_graph(graph, calibration(), stem)
            return openvino_session(xml, "int8", num_threads)
        onnx = stem.with_suffix(".onnx")
        if not onnx.is_file():
            ort_int8_graph(graph, calibration(), stem)
        return ort_session(onnx, num_threads)

    def judge(session: Any) -> GateReport:
        x = gate_images()
        reference = run_batched(fp32, x)
        candidate = run_batched(SessionBackend("candidate", session), x)
        return gate.judge(runtime, precision, reference, candidate)

    def ready() -> bool:
        if precision == "bf16":
            return graph.is_file()
        return stem.with_suffix(".xml" if runtime == "openvino" else ".onnx").is_file()

    session, report = gated(
        graph,
        runtime,
        precision,
        build=build,
        ready=ready,
        judge=judge,
        weights_sha256=weights_sha256,
    )
    return SessionBackend(f"{runtime}-{precision}", session, report)
