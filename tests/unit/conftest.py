"""Synthetic inference results for the FHIR builder tests: plain numbers, no torch."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from models.types import NIH_FINDINGS, FindingScore, ImageAnalysis

#: Calibrated probabilities of the synthetic study; every other finding gets 0.05.
#: Pneumothorax 0.9 is what the profile's `value-quantity=gt0.8` query must find.
DEFAULT_PROBABILITIES: Mapping[str, float] = {
    "Pneumothorax": 0.9,
    "Effusion": 0.62,
    "Atelectasis": 0.31,
    "Cardiomegaly": 0.12,
}
THRESHOLD = 0.5
IMAGE_SHA256 = "ab" * 32
RECORDED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_analysis(
    probabilities: Mapping[str, float] | None = None,
    *,
    untrained: bool = False,
    model_version: str | None = None,
    threshold: float = THRESHOLD,
) -> ImageAnalysis:
    """An ImageAnalysis with the given calibrated probabilities (others 0.05)."""
    probs = dict(DEFAULT_PROBABILITIES if probabilities is None else probabilities)
    findings = []
    for name in NIH_FINDINGS:
        p = probs.get(name, 0.05)
        # A mildly miscalibrated raw score, so logit/sigmoid differ from the calibrated value.
        sigmoid = min(max(p * 0.8 + 0.05, 1e-4), 1 - 1e-4)
        logit = math.log(sigmoid / (1 - sigmoid))
        findings.append(
            FindingScore(
                finding=name,
                logit=logit,
                sigmoid_score=sigmoid,
                calibrated_probability=p,
                band_low=max(0.0, p - 0.08),
                band_high=min(1.0, p + 0.06),
                threshold=threshold,
            )
        )
    logits = np.array([f.logit for f in findings], dtype=np.float32)
    if model_version is None:
        model_version = "densenet121-res224-nih+sha256:0123abcd"
        if untrained:
            model_version += "+untrained"
    return ImageAnalysis(
        findings=tuple(findings),
        cams=np.zeros((len(NIH_FINDINGS), 7, 7), dtype=np.float32),
        cam_bias=logits,
        features=np.zeros(1024, dtype=np.float32),
        model_version=model_version,
        untrained=untrained,
    )


def make_png(width: int = 8, height: int = 8, shade: int = 128) -> bytes:
    """A valid greyscale PNG, built by hand so the tests need no image library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + bytes([shade]) * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make_heatmaps(analysis: ImageAnalysis) -> dict[str, bytes]:
    return {
        f.finding: make_png(shade=40 + i) for i, f in enumerate(analysis.findings) if f.positive
    }


def make_study(
    study_id: str = "cxr-1", version: str = "3", patient: str = "Patient/p1"
) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "meta": {"versionId": version},
        "status": "available",
        "subject": {"reference": patient},
        "started": "2024-12-31T22:15:00+00:00",
    }


@pytest.fixture
def analysis() -> ImageAnalysis:
    return make_analysis()


@pytest.fixture
def untrained_analysis() -> ImageAnalysis:
    return make_analysis(untrained=True)


@pytest.fixture
def study() -> dict[str, Any]:
    return make_study()
