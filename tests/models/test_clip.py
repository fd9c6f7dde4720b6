"""CLIP: normalised 512-d embeddings, zero-shot tags, cached prompts, clear weight errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_errors import ConfigError, ModelError
from models.clip import ClipEncoder
from models.factory import load_clip
from models.onepass import export_onnx, onnx_cache_path
from models.types import NIH_FINDINGS


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip")


@pytest.fixture(scope="module")
def encoder(clip_cache: Path) -> ClipEncoder:
    return load_clip(weights="untrained", backend="torch", cache_dir=clip_cache)


def test_embeddings_and_tags(encoder: ClipEncoder, nih_images: list[Path]) -> None:
    results = encoder.analyze(nih_images[:2])
    for r in results:
        assert r.untrained and "untrained" in r.model_version
        assert r.embedding.shape == (512,)
        assert np.linalg.norm(r.embedding) == pytest.approx(1.0, abs=1e-5)
        assert sorted(t.finding for t in r.tags) == sorted(NIH_FINDINGS)
        scores = [t.score for t in r.tags]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    text = encoder.embed_texts(["a chest x-ray showing effusion"])
    assert text.shape == (1, 512)
    assert np.linalg.norm(text[0]) == pytest.approx(1.0, abs=1e-5)


def test_prompt_embeddings_cached(encoder: ClipEncoder, clip_cache: Path) -> None:
    assert len(list(clip_cache.glob("clip-prompts-*.npy"))) == 1


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_clip(weights=str(tmp_path / "absent.bin"))


def test_pretrained_tag_offline_fails_fast() -> None:
    with pytest.raises(ConfigError, match="CXR_CLIP_WEIGHTS"):
        load_clip(pretrained="laion2b_s34b_b79k", offline=True)


class _WrongTower(torch.nn.Module):
    """A stand-in graph with the tower's shapes and the wrong numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)).repeat(1, 171)[:, :512], dim=-1)


def test_onnx_tower_is_checked_against_torch_at_start_up(tmp_path: Path) -> None:
    encoder = load_clip(weights="untrained", backend="onnx", cache_dir=tmp_path)
    path = onnx_cache_path(tmp_path, "clip-image", encoder.weights_sha256)
    assert path.is_file()
    export_onnx(_WrongTower(), torch.zeros(1, 3, 224, 224), ["embedding"], path)
    with pytest.raises(ModelError, match=r"ONNX CLIP image tower .* disagrees with torch"):
        load_clip(weights="untrained", backend="onnx", cache_dir=tmp_path)


def test_auto_precision_serves_bf16_behind_the_gate_or_fp32_and_says_so(
    clip_cache: Path, nih_images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """CXR_CLIP_PRECISION=auto: the OpenVINO bf16 image tower when the CPU has bf16 and the
    gate passed on these images (its report kept), else fp32 ONNX with the reason logged;
    either way the embeddings are the fp32 tower's to within bf16 rounding."""
    fp32 = load_clip(weights="untrained", backend="onnx", cache_dir=clip_cache)
    with caplog.at_level("WARNING", logger="models.reduced"):
        auto = load_clip(
            weights="untrained",
            backend="onnx",
            cache_dir=clip_cache,
            precision="auto",
            gate_images=nih_images,
        )
    if auto.precision == "bf16":
        assert auto.backend == "openvino"
        assert auto.gate_report is not None and auto.gate_report.passed
        assert auto.gate_report.images == len(nih_images)
        assert list(clip_cache.glob("clip-image-*-openvino-bf16.gate.json"))
    else:
        assert (auto.backend, auto.precision, auto.gate_report) == ("onnx", "fp32", None)
        assert "CLIP precision auto" in caplog.text and "serving onnx/fp32" in caplog.text
    a = np.stack([r.embedding for r in fp32.analyze(nih_images[:2])])
    b = np.stack([r.embedding for r in auto.analyze(nih_images[:2])])
    cosine = (a * b).sum(axis=1)
    assert np.all(cosine > 0.999), cosine
    if auto.precision == "bf16":
        assert not np.array_equal(a, b)  # bf16 really ran
