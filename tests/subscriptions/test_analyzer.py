"""ModelAnalyzer.analyze_many: one classifier pass and one CLIP pass for a whole batch, and an
undecodable image fails alone. The models are stand-ins that record what they were given."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from cxr_errors import InputError
from models.preprocess import DecodedImage
from models.types import ImageAnalysis
from subscriptions.analyzer import ModelAnalyzer
from subscriptions.pipeline import AnalyzedImage
from tests.factories import make_analysis, make_xray_png


class _Classifier:
    model_version = "test-model"
    preprocess = SimpleNamespace(max_image_bytes=1 << 20, max_image_pixels=1 << 20)

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []

    def analyze(self, images: Sequence[DecodedImage], *, batch_size: int) -> list[ImageAnalysis]:
        self.calls.append(([img.width for img in images], batch_size))
        return [make_analysis({"Pneumothorax": img.width / 1000}) for img in images]


class _Clip:
    model_version = "clip-test"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def embed_images(
        self, images: Sequence[DecodedImage], *, batch_size: int
    ) -> npt.NDArray[np.float32]:
        self.calls.append((len(images), batch_size))
        return np.array([[img.width / 100] * 4 for img in images], dtype=np.float32)


def _analyzer() -> tuple[ModelAnalyzer, _Classifier, _Clip]:
    classifier, clip = _Classifier(), _Clip()
    fake: Any = (classifier, clip)
    return ModelAnalyzer(*fake), classifier, clip


def test_one_pass_for_the_batch_and_a_bad_image_fails_alone() -> None:
    analyzer, classifier, clip = _analyzer()
    images = [(make_xray_png(600), "a.png"), (b"not an image", "b.png"), (make_xray_png(900), "c")]
    results = analyzer.analyze_many(images)
    # the two decodable images in one pass each, in their order
    assert classifier.calls == [([600, 900], 2)]
    assert clip.calls == [(2, 2)]
    first, bad, last = results
    assert isinstance(bad, InputError)
    assert isinstance(first, AnalyzedImage) and isinstance(last, AnalyzedImage)
    assert first.analysis.findings[7].calibrated_probability == pytest.approx(0.6)
    assert last.clip_embedding is not None and last.clip_embedding[0] == 9.0
    assert last.clip_version == "clip-test"
    # heatmaps for the positive findings only: Pneumothorax 0.6 and 0.9, at threshold 0.5
    assert "Pneumothorax" in first.heatmaps and "Pneumothorax" in last.heatmaps
    assert "Atelectasis" not in first.heatmaps  # 0.05


def test_a_single_image_is_a_batch_of_one() -> None:
    analyzer, classifier, clip = _analyzer()
    result = analyzer.analyze(make_xray_png(500), "x.png")
    assert classifier.calls == [([500], 1)] and clip.calls == [(1, 1)]
    assert result.analysis.findings[7].calibrated_probability == pytest.approx(0.5)
