"""The one forward pass: logits, class activation maps and pooled features together.

torchxrayvision's DenseNet ends in ``Linear(avgpool(relu(norm5(x))))``. Because
the classifier is linear over the spatial average, applying it at every
position of ``A = relu(F)`` gives maps whose spatial mean plus the bias *is*
the logit: ``CAM_k = w_k · A`` and ``mean(CAM_k) + b_k = logit_k``. The CAMs
cost one 1×1 convolution (~1.8 MFLOP against 5.5 GFLOP for the network), with
no gradients and no second pass.

Two backends run the same :class:`OnePassNet`:

* ``torch`` — eager PyTorch, the numerical reference;
* ``onnx`` — ONNX Runtime on a graph exported from the *loaded* weights
  (~2× eager on CPU). The exported file is cached under a name holding the
  weights' sha256 and this module's graph version, so it can never be stale.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from cxr_errors import ConfigError, ModelError

__all__ = [
    "GRAPH_VERSION",
    "OnePassNet",
    "OnnxBackend",
    "PassBackend",
    "PassOutput",
    "TorchBackend",
    "export_onnx",
    "onnx_cache_path",
    "release_module",
]

log = logging.getLogger(__name__)

#: Bump when OnePassNet's outputs change: it is part of every cached file name.
GRAPH_VERSION = 1


@dataclass(frozen=True)
class PassOutput:
    """Raw outputs for a batch, in the weights' own label order (all model outputs)."""

    logits: npt.NDArray[np.float32]
    """[B, K]"""
    cams: npt.NDArray[np.float32]
    """[B, K, h, w] without bias"""
    features: npt.NDArray[np.float32]
    """[B, C] pooled relu(F)"""


class OnePassNet(nn.Module):
    """DenseNet features + classifier, returning (logits, cams, pooled features)."""

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        features, classifier = densenet.features, densenet.classifier
        if not isinstance(features, nn.Module) or not isinstance(classifier, nn.Linear):
            raise ModelError("expected a DenseNet with .features and a Linear .classifier")
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # torchxrayvision's features() stops after norm5; its head applies the ReLU
        a = F.relu(self.features(x))
        w = self.classifier.weight
        cams = F.conv2d(a, w[:, :, None, None])
        pooled = a.mean(dim=(2, 3))
        logits = F.linear(pooled, w, self.classifier.bias)
        return logits, cams, pooled


def release_module(module: nn.Module) -> int:
    """Free a module's parameters and buffers in place (each becomes an empty tensor) and
    return the bytes released. For a process that serves from an exported graph and never
    runs the torch module again: any later call fails on the shapes, it cannot run stale."""
    freed = 0
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            freed += tensor.numel() * tensor.element_size()
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    return freed


class PassBackend(Protocol):
    name: str

    def run(self, x: npt.NDArray[np.float32]) -> PassOutput: ...


class TorchBackend:
    name = "torch"

    def __init__(self, net: OnePassNet) -> None:
        self.net = net.eval()

    def run(self, x: npt.NDArray[np.float32]) -> PassOutput:
        with torch.inference_mode():
            logits, cams, pooled = self.net(torch.from_numpy(x))
        return PassOutput(logits.numpy(), cams.numpy(), pooled.numpy())


def onnx_cache_path(cache_dir: Path, prefix: str, weights_sha256: str) -> Path:
    return cache_dir / f"{prefix}-{weights_sha256[:32]}-g{GRAPH_VERSION}.onnx"


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    output_names: list[str],
    path: Path | None = None,
) -> bytes:
    """Export ``module`` with a dynamic batch axis; write atomically to ``path`` if given."""
    import io

    buf = io.BytesIO()
    dynamic = {"x": {0: "batch"}} | {name: {0: "batch"} for name in output_names}
    # The TorchScript exporter: ~1 s, and needs no onnxscript. Not under no_grad:
    # there nn.MultiheadAttention takes its fused fast path, which has no ONNX op.
    # Its deprecation notice and tracer warnings are about the exporter, not our graph;
    # the start-up comparison against torch is what guards the result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        torch.onnx.export(
            module.eval(),
            (example,),
            buf,  # type: ignore[arg-type]  # file objects are accepted at runtime
            input_names=["x"],
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    data = buf.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # rename is atomic: a concurrent worker sees the whole file or none
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return data


def ort_session(model: bytes | Path, num_threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = num_threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initializers are noise here
    src = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime could not load the exported graph: {exc}") from exc


def load_or_export(
    module: nn.Module,
    example: torch.Tensor,
    output_names: list[str],
    *,
    cache_dir: Path | None,
    prefix: str,
    weights_sha256: str,
) -> bytes | Path:
    """The cached graph for these weights, exporting it first if needed."""
    if cache_dir is None:
        return export_onnx(module, example, output_names)
    path = onnx_cache_path(cache_dir, prefix, weights_sha256)
    if path.is_file():
        return path
    log.info("exporting ONNX graph to %s", path)
    try:
        export_onnx(module, example, output_names, path)
    except OSError as exc:
        raise ConfigError(f"cannot write the ONNX cache {path}: {exc}") from exc
    return path


class OnnxBackend:
    name = "onnx"

    def __init__(
        self,
        net: OnePassNet,
        *,
        input_size: int,
        weights_sha256: str,
        cache_dir: Path | None,
        num_threads: int | None = None,
        check_atol: float = 1e-4,
    ) -> None:
        example = torch.zeros(1, 1, input_size, input_size)
        source = load_or_export(
            net,
            example,
            ["logits", "cams", "features"],
            cache_dir=cache_dir,
            prefix="densenet-onepass",
            weights_sha256=weights_sha256,
        )
        self.source = source
        self.session = ort_session(source, num_threads)
        self._check_against(net, input_size, check_atol)

    def run(self, x: npt.NDArray[np.float32]) -> PassOutput:
        logits, cams, feats = self.session.run(None, {"x": np.ascontiguousarray(x, np.float32)})
        return PassOutput(logits, cams, feats)

    def _check_against(self, net: OnePassNet, input_size: int, atol: float) -> None:
        """Start-up check against the torch reference: a wrong graph never serves."""
        gen = torch.Generator().manual_seed(1234)
        probe = torch.rand(1, 1, input_size, input_size, generator=gen) * 2048.0 - 1024.0
        ref = TorchBackend(net).run(probe.numpy())
        got = self.run(probe.numpy())
        for name in ("logits", "cams", "features"):
            a, b = getattr(ref, name), getattr(got, name)
            scale = max(1.0, float(np.abs(a).max()))
            err = float(np.abs(a - b).max()) / scale
            if err > atol:
                raise ModelError(
                    f"ONNX graph {self.source if isinstance(self.source, Path) else '(memory)'} "
                    f"disagrees with torch on {name}: scaled max error {err:.2e} > {atol:g}"
                )
