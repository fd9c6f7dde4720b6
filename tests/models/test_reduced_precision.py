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
def reduced_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reduced")


def _limits(monkeypatch: pytest.MonkeyPatch, **override: float) -> None:
    """Make every GateLimits() the gate builds use ``override`` (the gate itself unchanged)."""
    original = precision_gate.GateLimits.__init__
    fields = precision_gate.GateLimits.__dataclass_fields__

    def init(self: precision_gate.GateLimits, **kw: float) -> None:
        defaults = {k: getattr(precision_gate.GateLimits, k) for k in fields}
        original(self, **(defaults | override | kw))

    monkeypatch.setattr(precision_gate.GateLimits, "__init__", init)


def test_fp32_onnx_is_the_default() -> None:
    settings = Settings(model_weights="untrained")
    assert settings.model_backend == "onnx" and settings.model_precision == "fp32"
    classifier = load_classifier("untrained", tta=False)
    assert isinstance(classifier.backend, OnnxBackend)
    assert classifier.gate_report is None


def test_untrained_probabilities_are_spread(reduced_cache: Path, gate_set: list[Path]) -> None:
    """The premise of the gate tests: the fp32 probabilities are not saturated."""
    fp32 = load_classifier("untrained", onnx_cache_dir=reduced_cache, tta=False)
    p = np.array([[f.calibrated_probability for f in a.findings] for a in fp32.analyze(gate_set)])
    assert 0.1 < float(np.median(p)) < 0.9
    assert float(((p > 0.02) & (p < 0.98)).mean()) > 0.5
    flagged = (p >= 0.5).mean()
    assert 0.05 < flagged < 0.95  # flags on both sides of the threshold


def test_bf16_only_where_the_cpu_has_it(reduced_cache: Path, gate_set: list[Path]) -> None:
    """With AVX-512 BF16/AMX the bf16 graph is gated like any other; without, OpenVINO would
    quietly run f32 under a bf16 label, so it is refused."""
    kwargs = {
        "backend": "openvino",
        "precision": "bf16",
        "onnx_cache_dir": reduced_cache,
        "gate_images": gate_set,
        "tta": False,
    }
    if not reduced.cpu_has_bf16():
        with pytest.raises(ConfigError, match="no bf16 arithmetic"):
            load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
        return
    try:
        bf16 = load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    except ModelError as exc:
        assert "failed the precision gate" in str(exc)
        return
    report = bf16.gate_report
    assert report is not None and report.passed and report.images == len(gate_set)
    assert 0.0 < report.max_abs_delta_probability <= 0.02  # bf16 really ran


def test_int8_gate_is_measured_stored_and_enforced(
    reduced_cache: Path, gate_set: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO int8 (NNCF) on 16 gate images with the real limits: whatever the verdict,
    the numbers are stored next to the graph, and the verdict decides whether it serves."""
    kwargs = {
        "backend": "openvino",
        "precision": "int8",
        "onnx_cache_dir": reduced_cache,
        "gate_images": gate_set[:16],
        "tta": False,
    }
    try:
        served: Classifier | None = load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    except ModelError as exc:
        assert "failed the precision gate" in str(exc)
        served = None
    (stored,) = reduced_cache.glob("*-openvino-int8.gate.json")
    assert list(reduced_cache.glob("*-openvino-int8.xml"))
    body = json.loads(stored.read_text())
    assert body["images"] == 16 and body["precision"] == "int8"
    assert body["passed"] == (not body["failures"]) == (served is not None)
    if served is not None:
        assert served.gate_report is not None and served.gate_report.passed
        assert body["max_abs_delta_probability"] <= 0.02
        return
    # failed: the next start refuses before it compiles anything
    compiled: list[object] = []
    real = reduced.openvino_session
    monkeypatch.setattr(
        reduced, "openvino_session", lambda *a, **k: compiled.append(a) or real(*a, **k)
    )
    with pytest.raises(ModelError, match="failed the precision gate"):
        load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    assert compiled == []


def test_pass_fail_and_read_back(
    reduced_cache: Path, gate_set: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same int8 graph judged under limits nothing meets (|Δp| must be 0: fails, stored,
    refused) and under limits everything meets (passes, stored, serves; the next start reads
    the stored report back instead of measuring again)."""
    kwargs = {
        "backend": "openvino",
        "precision": "int8",
        "onnx_cache_dir": reduced_cache,
        "gate_images": gate_set[:16],
        "tta": False,
    }
    report_path = next(iter(reduced_cache.glob("*-openvino-int8.gate.json")), None)
    if report_path is not None:
        report_path.unlink()
    _limits(monkeypatch, max_abs_delta_probability=0.0)
    with pytest.raises(ModelError, match="failed the precision gate"):
        load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    (stored,) = reduced_cache.glob("*-openvino-int8.gate.json")
    assert json.loads(stored.read_text())["passed"] is False
    stored.unlink()
    _limits(
        monkeypatch,
        max_abs_delta_probability=1.0,
        min_flag_agreement=0.0,
        min_cam_correlation=-1.0,
        min_feature_correlation=-1.0,
    )
    served = load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    assert served.gate_report is not None and served.gate_report.passed
    before = stored.stat().st_mtime_ns
    again = load_classifier("untrained", **kwargs)  # type: ignore[arg-type]
    assert again.gate_report == served.gate_report
    assert stored.stat().st_mtime_ns == before
    fp32 = load_classifier("untrained", onnx_cache_dir=reduced_cache, tta=False)
    a, b = fp32.analyze(gate_set[:2]), again.analyze(gate_set[:2])
    assert [x.model_version for x in a] == [y.model_version for y in b]
    stored.unlink()  # leave no passing report made under loosened limits


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


def test_auto_serves_bf16_where_it_passes_the_gate(
    reduced_cache: Path, gate_set: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """``auto`` on this machine: OpenVINO bf16 behind a passed gate where the CPU has bf16;
    where bf16 cannot serve, fp32 on the configured runtime and a WARNING that says why."""
    with caplog.at_level("WARNING", logger="models.reduced"):
        served = load_classifier(
            "untrained",
            precision="auto",
            onnx_cache_dir=reduced_cache,
            gate_images=gate_set,
            tta=False,
        )
    if served.precision == "bf16":
        assert served.backend.name == "openvino-bf16"
        assert served.gate_report is not None and served.gate_report.passed
        assert not caplog.records
        return
    assert served.precision == "fp32" and isinstance(served.backend, OnnxBackend)
    (warning,) = caplog.records
    assert "precision auto" in warning.getMessage() and "serving onnx/fp32" in warning.getMessage()


def test_auto_without_bf16_arithmetic_serves_fp32_and_says_why(
    reduced_cache: Path,
    gate_set: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(reduced, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="models.reduced"):
        served = load_classifier(
            "untrained",
            precision="auto",
            onnx_cache_dir=reduced_cache,
            gate_images=gate_set[:4],
            tta=False,
        )
    assert served.precision == "fp32" and isinstance(served.backend, OnnxBackend)
    assert served.gate_report is None
    assert "no bf16 arithmetic" in caplog.text and "serving onnx/fp32" in caplog.text


def test_auto_never_serves_a_graph_that_failed_the_gate(
    tmp_path: Path,
    gate_set: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bf16 graph judged under limits no graph meets (flags identical on more than 100 % of
    the pairs): auto serves fp32, and the failed report stays stored, so the next start falls
    back at once without judging again. The limits fail whatever the arithmetic, so on a CPU
    without bf16 (where OpenVINO would quietly run f32) the bf16 check is told yes and the
    same path runs."""
    monkeypatch.setattr(reduced, "cpu_has_bf16", lambda: True)
    _limits(monkeypatch, min_flag_agreement=1.01)
    kwargs = {"precision": "auto", "onnx_cache_dir": tmp_path, "gate_images": gate_set[:4]}
    with caplog.at_level("WARNING", logger="models.reduced"):
        served = load_classifier("untrained", tta=False, **kwargs)  # type: ignore[arg-type]
    assert served.precision == "fp32" and isinstance(served.backend, OnnxBackend)
    assert "failed the precision gate" in caplog.text
    (stored,) = tmp_path.glob("*-openvino-bf16.gate.json")
    assert json.loads(stored.read_text())["passed"] is False
    judged: list[object] = []
    monkeypatch.setattr(
        "models.classifier.compare", lambda *a, **k: judged.append(a) or pytest.fail("judged")
    )
    again = load_classifier("untrained", tta=False, **kwargs)  # type: ignore[arg-type]
    assert again.precision == "fp32" and judged == []


def test_auto_falls_back_only_on_refusals() -> None:
    """A bug in building the graph is not a reason to serve something else quietly."""

    def build(runtime: reduced.Runtime, precision: reduced.Precision) -> str:
        if precision == "bf16":
            raise RuntimeError("a bug")
        return f"{runtime}/{precision}"

    with pytest.raises(RuntimeError, match="a bug"):
        reduced.auto_precision("DenseNet", "onnx", build)

    def refuse(runtime: reduced.Runtime, precision: reduced.Precision) -> str:
        if precision == "bf16":
            raise ConfigError("no bf16 here")
        return f"{runtime}/{precision}"

    assert reduced.auto_precision("DenseNet", "onnx", refuse) == ("onnx/fp32", "onnx", "fp32")
    assert reduced.auto_precision("DenseNet", "onnx", lambda r, p: f"{r}/{p}") == (
        "openvino/bf16",
        "openvino",
        "bf16",
    )
