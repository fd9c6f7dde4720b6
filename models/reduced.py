"""Reduced-precision serving graphs (bf16, int8) on OpenVINO or ONNX Runtime, behind the gate.

Graphs are built from the fp32 ONNX export of the *loaded* weights (:mod:`models.onepass`):

* ``openvino``/``fp32`` and ``openvino``/``bf16`` — OpenVINO compiles the ONNX graph with
  ``INFERENCE_PRECISION_HINT`` f32 or bf16 (AVX-512 BF16 / AMX where the CPU has them);
* ``openvino``/``int8`` — NNCF post-training quantization on calibration images, saved as
  OpenVINO IR;
* ``onnx``/``int8`` — ONNX Runtime static quantization (QDQ, per-channel weights);
* ``onnx``/``bf16`` — ONNX Runtime's CPU provider has no bf16 kernels on x86: refused.

``auto`` asks for OpenVINO bf16 and serves fp32 on the configured runtime whenever bf16 cannot
serve (no BF16 arithmetic on this CPU, no OpenVINO, or a gate that did not pass for the loaded
weights); :func:`auto_precision` logs which, and why.

Every reduced graph is judged by :mod:`models.precision_gate` against fp32 before it serves;
the report is stored next to the graph (``….gate.json``), read back at the next start, and a
graph whose report did not pass is never used (:class:`~cxr_errors.ModelError`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from cxr_errors import ConfigError, ModelError
from models.precision_gate import GateReport

__all__ = [
    "AUTO",
    "PRECISIONS",
    "RUNTIMES",
    "OpenVinoSession",
    "Precision",
    "Requested",
    "Runtime",
    "auto_precision",
    "cpu_has_bf16",
    "gate_path",
    "graph_stem",
    "openvino_int8_graph",
    "openvino_session",
    "ort_int8_graph",
]

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "int8"]
Requested = Literal["fp32", "bf16", "int8", "auto"]
"""a precision setting: one precision, or ``auto`` (see :func:`auto_precision`)"""
Runtime = Literal["onnx", "openvino"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "int8")
RUNTIMES: tuple[Runtime, ...] = ("onnx", "openvino")
AUTO: tuple[Runtime, Precision] = ("openvino", "bf16")
"""what ``auto`` tries first: the fastest graph that passed the gate on this machine kind"""

_OV_HINT = {"fp32": "f32", "bf16": "bf16"}


def graph_stem(fp32_graph: Path, runtime: Runtime, precision: Precision) -> Path:
    """``densenet-onepass-<sha>-g1.onnx`` → ``densenet-onepass-<sha>-g1-openvino-int8``."""
    return fp32_graph.with_name(f"{fp32_graph.stem}-{runtime}-{precision}")


def gate_path(fp32_graph: Path, runtime: Runtime, precision: Precision) -> Path:
    stem = graph_stem(fp32_graph, runtime, precision)
    return stem.with_name(stem.name + ".gate.json")


class OpenVinoSession:
    """A compiled OpenVINO model with ONNX Runtime's ``run(None, feeds)`` shape of call."""

    def __init__(self, compiled: Any, precision: Precision) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one call at a time
        self.precision = precision
        self.hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, _names: object, feeds: dict[str, npt.NDArray[np.float32]]) -> list[Any]:
        with self._lock:
            result = self._request.infer(feeds)
            return [np.array(result[out]) for out in self._compiled.outputs]


def _ov_core() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("the openvino runtime needs the `openvino` package") from exc
    return ov.Core()


def cpu_has_bf16() -> bool:
    """Whether OpenVINO can run bf16 on this CPU (AVX-512 BF16 or AMX). Without it, the bf16
    hint is silently ignored and the graph runs f32: that is refused, never passed off."""
    return "BF16" in _ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_session(
    model: bytes | Path | Any, precision: Precision, num_threads: int | None
) -> OpenVinoSession:
    """Compile an ONNX file/bytes or an OpenVINO IR path (``.xml``) or model for the CPU."""
    core = _ov_core()
    if precision == "bf16" and not cpu_has_bf16():
        caps = ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        raise ConfigError(
            f"this CPU has no bf16 arithmetic (OpenVINO's CPU capabilities: {caps}); OpenVINO "
            "would run the bf16 graph as f32. Use fp32 or int8 here"
        )
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    # int8 graphs carry their own precision; their remaining float ops run in f32
    config["INFERENCE_PRECISION_HINT"] = _OV_HINT.get(precision, "f32")
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    try:
        if isinstance(model, bytes):
            ov_model = core.read_model(model=model, weights=b"")
        elif isinstance(model, Path):
            ov_model = core.read_model(str(model))
        else:
            ov_model = model
        compiled = core.compile_model(ov_model, "CPU", config)
    except Exception as exc:
        raise ModelError(f"OpenVINO could not compile the graph: {exc}") from exc
    return OpenVinoSession(compiled, precision)


T = TypeVar("T")


def auto_precision(
    what: str, runtime: Runtime, build: Callable[[Runtime, Precision], T]
) -> tuple[T, Runtime, Precision]:
    """``build`` the :data:`AUTO` graph, or fp32 on ``runtime`` when that one cannot serve.

    Only the refusals a machine or the gate give (:class:`ConfigError`: no bf16 on this CPU,
    no OpenVINO; :class:`ModelError`: the graph failed the precision gate or did not compile)
    fall back; the reason is logged at WARNING, so "auto" never hides what serves."""
    try:
        return build(*AUTO), *AUTO
    except (ConfigError, ModelError) as exc:
        log.warning(
            "%s precision auto: %s/%s cannot serve here, serving %s/fp32: %s",
            what,
            *AUTO,
            runtime,
            exc.message,
        )
    return build(runtime, "fp32"), runtime, "fp32"


def _atomic_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name, suffix=".tmp"))


def openvino_int8_graph(
    fp32_graph: Path, calibration: Sequence[npt.NDArray[np.float32]], out: Path
) -> Path:
    """NNCF post-training quantization → IR ``out.xml``/``out.bin`` (written atomically)."""
    import nncf
    import openvino as ov

    core = _ov_core()
    model = core.read_model(str(fp32_graph))
    dataset = nncf.Dataset(list(calibration), lambda x: {"x": x})
    try:
        quantized = nncf.quantize(
            model,
            dataset,
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=sum(len(x) for x in calibration),
            fast_bias_correction=True,
        )
    except Exception as exc:
        raise ModelError(f"NNCF could not quantize {fp32_graph.name}: {exc}") from exc
    tmp = _atomic_dir(out)
    try:
        ov.save_model(quantized, str(tmp / "m.xml"), compress_to_fp16=False)
        os.replace(tmp / "m.bin", out.with_suffix(".bin"))
        os.replace(tmp / "m.xml", out.with_suffix(".xml"))  # the .xml last: it marks "ready"
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return out.with_suffix(".xml")


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over in-memory batches."""

    def __init__(self, batches: Sequence[npt.NDArray[np.float32]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        batch = next(self._it, None)
        return None if batch is None else {"x": batch}


def ort_int8_graph(
    fp32_graph: Path, calibration: Sequence[npt.NDArray[np.float32]], out: Path
) -> Path:
    """ONNX Runtime static quantization: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    path = out.with_suffix(".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    reader: CalibrationDataReader = _Reader(list(calibration))  # type: ignore[assignment]
    # the quantizer logs one root WARNING per pre-activation BatchNorm it cannot fold
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(fp32_graph),
            tmp,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ModelError(f"ONNX Runtime could not quantize {fp32_graph.name}: {exc}") from exc
    finally:
        root.setLevel(level)
    return path


def gated(
    fp32_graph: Path,
    runtime: Runtime,
    precision: Precision,
    *,
    build: Callable[[], Any],
    ready: Callable[[], bool],
    judge: Callable[[Any], GateReport],
    weights_sha256: str,
) -> tuple[Any, GateReport]:
    """The session for a reduced graph and its gate report.

    A stored report for these weights is read back when the graph it judged is still there
    (``ready``); otherwise the graph is built and judged, and the report stored next to it.
    A graph whose report failed is never used: this raises, before building, every time.
    """
    report_path = gate_path(fp32_graph, runtime, precision)
    stored = GateReport.read(report_path)
    if stored is not None and stored.weights_sha256 != weights_sha256:
        stored = None
    if stored is not None and stored.passed and not ready():
        stored = None  # the graph was removed: rebuild and judge it again
    if stored is None:
        session = build()
        stored = judge(session)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(stored.to_json() + "\n", encoding="utf-8")
        print(stored.summary(), flush=True)
    elif stored.passed:
        log.info("stored %s", stored.summary())
        session = build()
    if not stored.passed:
        raise ModelError(
            f"the {runtime}/{precision} graph for weights {weights_sha256[:12]} failed the "
            f"precision gate and is never used ({report_path}): {stored.summary()}. "
            "Serve fp32 (CXR_MODEL_PRECISION=fp32) or another precision; delete the report "
            "to judge a rebuilt graph again"
        )
    return session, stored
