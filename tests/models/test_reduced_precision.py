"""Reduced-precision serving graphs behind the precision gate, on the real NIH samples.

What this proves with the seeded untrained DenseNet: its BatchNorm statistics are set from a
batch of input-range noise and its classifier is scaled down (models/registry.py
build_untrained_densenet), so on real radiographs its probabilities spread over (0, 1)
instead of sitting at 0 or 1, and its CAMs vary across the lung fields. A bf16 or int8 graph
that computed the wrong thing would move those probabilities, flip flags at 0.5 and
decorrelate the CAMs: the gate measures the reduced graph's *arithmetic* against the fp32
graph of the same weights on real images. It says nothing about clinical accuracy (that is
the ΔAUROC criterion, which needs trained weights and is tested on arrays in
test_precision_gate.py), and it reruns for every new weights sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import models.precision_gate as precision_gate
import models.reduced as reduced
from cxr_errors import ConfigError, ModelError
from fhir_service.settings import Settings
from models.classifier import Classifier
from models.factory import load_classifier
from models.onepass import OnnxBackend


@pytest.fixture(scope="module")
def gate_set(nih_dir: Path) -> list[Path]:
    return sorted(nih_dir.glob("*.png"))


@pytest.fixture(scope="module")
def bf16_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reduced")


@pytest.fixture(scope="module")
def bf16(bf16_cache: Path, gate_set: list[Path]) -> Classifier:
    return load_classifier(
        "untrained",
        backend="openvino",
        precision="bf16",
        onnx_cache_dir=bf16_cache,
        gate_images=gate_set,
        tta=False,
    )


def test_fp32_onnx_is_the_default() -> None:
    settings = Settings(model_weights="untrained")
    assert settings.model_backend == "onnx" and settings.model_precision == "fp32"
    classifier = load_classifier("untrained", tta=False)
    assert isinstance(classifier.backend, OnnxBackend)
    assert classifier.gate_report is None


def test_untrained_probabilities_are_spread(
    bf16: Classifier, gate_set: list[Path], bf16_cache: Path
) -> None:
    """The premise of the gate test: the fp32 probabilities are not saturated."""
    fp32 = load_classifier("untrained", onnx_cache_dir=bf16_cache, tta=False)
    p = np.array([[f.calibrated_probability for f in a.findings] for a in fp32.analyze(gate_set)])
    assert 0.1 < float(np.median(p)) < 0.9
    assert float(((p > 0.02) & (p < 0.98)).mean()) > 0.5
    flagged = (p >= 0.5).mean()
    assert 0.05 < flagged < 0.95  # flags on both sides of the threshold


def test_bf16_passes_the_gate_and_stores_its_numbers(
    bf16: Classifier, bf16_cache: Path, gate_set: list[Path]
) -> None:
    report = bf16.gate_report
    assert report is not None and report.passed, report
    assert report.runtime == "openvino" and report.precision == "bf16"
    assert report.images == len(gate_set) >= 50
    assert report.max_abs_delta_probability <= 0.02
    assert report.flag_agreement >= 0.99 and report.cam_correlation_min >= 0.98
    assert report.max_abs_delta_probability > 0.0  # bf16 really ran: not the fp32 graph
    (stored,) = bf16_cache.glob("*-openvino-bf16.gate.json")
    body = json.loads(stored.read_text())
    assert body["passed"] is True and body["weights_sha256"] == bf16.weights_sha256
    assert body["max_abs_delta_probability"] == report.max_abs_delta_probability


def test_bf16_serves_what_fp32_serves(
    bf16: Classifier, bf16_cache: Path, gate_set: list[Path]
) -> None:
    fp32 = load_classifier("untrained", onnx_cache_dir=bf16_cache, tta=False)
    for a, b in zip(fp32.analyze(gate_set[:4]), bf16.analyze(gate_set[:4]), strict=True):
        assert a.model_version == b.model_version and b.untrained
        pa = np.array([f.calibrated_probability for f in a.findings])
        pb = np.array([f.calibrated_probability for f in b.findings])
        assert float(np.abs(pa - pb).max()) <= 0.02


def test_stored_report_is_read_back_not_remeasured(
    bf16: Classifier, bf16_cache: Path, gate_set: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (stored,) = bf16_cache.glob("*-openvino-bf16.gate.json")
    before = stored.stat().st_mtime_ns

    def no_gate_images() -> list[Path]:
        raise AssertionError("the stored report should have been used")

    again = load_classifier(
        "untrained",
        backend="openvino",
        precision="bf16",
        onnx_cache_dir=bf16_cache,
        gate_images=gate_set,
        tta=False,
    )
    assert again.gate_report == bf16.gate_report
    assert stored.stat().st_mtime_ns == before


def test_a_failing_graph_is_never_used(
    tmp_path: Path, gate_set: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Limits no real bf16 graph meets (|Δp| must be 0): the gate fails, the report says so,
    and the next start refuses before it even compiles the graph."""
    strict = precision_gate.GateLimits(max_abs_delta_probability=0.0)
    monkeypatch.setattr(precision_gate.GateLimits, "__init__", _frozen_defaults(strict))
    kwargs = {
        "backend": "openvino",
        "precision": "bf16",
        "onnx_cache_dir": tmp_path,
        "gate_images": gate_set[:8],
        "tta": False,
    }
    with pytest.raises(ModelError, match="failed the precision gate"):
        load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    (stored,) = tmp_path.glob("*-openvino-bf16.gate.json")
    body = json.loads(stored.read_text())
    assert body["passed"] is False and body["failures"]
    compiled: list[object] = []
    real = reduced.openvino_session
    monkeypatch.setattr(
        reduced, "openvino_session", lambda *a, **k: compiled.append(a) or real(*a, **k)
    )
    with pytest.raises(ModelError, match="failed the precision gate"):
        load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    assert compiled == []


def _frozen_defaults(limits: precision_gate.GateLimits) -> object:
    original = precision_gate.GateLimits.__init__

    def init(self: precision_gate.GateLimits, **kw: float) -> None:
        original(self, **({k: getattr(limits, k) for k in limits.__dataclass_fields__} | kw))

    return init


def test_onnx_runtime_has_no_bf16(tmp_path: Path, gate_set: list[Path]) -> None:
    with pytest.raises(ConfigError, match="no bf16 kernels"):
        load_classifier(
            "untrained",
            precision="bf16",
            onnx_cache_dir=tmp_path,
            gate_images=gate_set[:4],
            tta=False,
        )


def test_reduced_precision_needs_gate_images(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gate"):
        load_classifier("untrained", backend="openvino", precision="int8", onnx_cache_dir=tmp_path)
