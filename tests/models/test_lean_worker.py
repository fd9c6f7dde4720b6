"""The lean worker: once the exported graphs serve, the torch modules are freed, and the
worker's answers do not change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_errors import ModelError
from fhir_service.runtime import build_analyzer
from fhir_service.settings import Settings


def test_lean_analyzer_frees_torch_and_answers_the_same(
    test_settings: Settings, tmp_path: Path, nih_images: list[Path]
) -> None:
    settings = test_settings.model_copy(update={"model_cache_dir": tmp_path})
    full = build_analyzer(settings, lean=False)
    lean = build_analyzer(settings, lean=True)
    assert all(p.numel() == 0 for p in lean.classifier.net.parameters())  # type: ignore[attr-defined]
    assert all(p.numel() == 0 for p in lean.clip.model.parameters())  # type: ignore[union-attr]
    assert any(p.numel() > 0 for p in full.classifier.net.parameters())  # type: ignore[attr-defined]
    data = nih_images[0].read_bytes()
    a, b = full.analyze(data, "a"), lean.analyze(data, "b")
    assert a.analysis.model_version == b.analysis.model_version
    for fa, fb in zip(a.analysis.findings, b.analysis.findings, strict=True):
        assert fa.calibrated_probability == pytest.approx(fb.calibrated_probability, abs=1e-6)
    np.testing.assert_allclose(a.clip_embedding, b.clip_embedding, atol=1e-6)  # type: ignore[arg-type]
    assert a.heatmaps.keys() == b.heatmaps.keys()
    assert set(lean.last_timings) == {"decode", "densenet", "clip", "overlays"}
    with pytest.raises(ModelError, match="released"):
        lean.clip.embed_texts(["effusion"])  # type: ignore[union-attr]
