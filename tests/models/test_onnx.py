"""ONNX Runtime (serving) against torch (reference), and the sha256-keyed graph cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.classifier import TTA_VIEWS, Classifier
from models.factory import load_classifier
from models.onepass import GRAPH_VERSION, TorchBackend


def test_onnx_agrees_with_torch(onnx_classifier: Classifier, nih_images: list[Path]) -> None:
    x = onnx_classifier.prepare(nih_images).numpy()
    got = onnx_classifier.run(x)
    ref = TorchBackend(onnx_classifier.net).run(x)
    for name in ("logits", "cams", "features"):
        a, b = getattr(ref, name), getattr(got, name)
        scale = max(1.0, float(np.abs(a).max()))
        assert float(np.abs(a - b).max()) / scale <= 1e-4, name


def test_graph_cached_by_weights_sha256(onnx_classifier: Classifier, onnx_cache: Path) -> None:
    files = list(onnx_cache.glob("*.onnx"))
    assert [f.name for f in files] == [
        f"densenet-onepass-{onnx_classifier.weights_sha256[:32]}-g{GRAPH_VERSION}.onnx"
    ]
    mtime = files[0].stat().st_mtime_ns
    again = load_classifier("untrained", backend="onnx", onnx_cache_dir=onnx_cache, tta=False)
    assert again.weights_sha256 == onnx_classifier.weights_sha256
    assert files[0].stat().st_mtime_ns == mtime  # reused, not re-exported


def test_tta_band_brackets_the_probability(
    onnx_classifier: Classifier, nih_images: list[Path]
) -> None:
    assert onnx_classifier.tta and TTA_VIEWS == 3
    results = onnx_classifier.analyze(nih_images[:2])
    for analysis in results:
        assert analysis.untrained and "untrained" in analysis.model_version
        for f in analysis.findings:
            assert 0.0 <= f.band_low <= f.calibrated_probability <= f.band_high <= 1.0
        assert any(f.band_high - f.band_low > 1e-4 for f in analysis.findings)
