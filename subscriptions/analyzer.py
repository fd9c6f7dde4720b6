"""The model layer behind the job's :class:`~subscriptions.pipeline.Analyzer` interface.

Loaded once per worker process: the DenseNet (one pass → scores, CAMs, features) and CLIP
(image embedding for similar-case search). Heatmaps are rendered for positive findings only.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from fhir_service.model_config import build_classifier, build_clip
from fhir_service.settings import Settings
from models.classifier import Classifier
from models.clip import ClipEncoder
from models.heatmap import overlay_png
from models.preprocess import decode_image
from subscriptions.pipeline import AnalyzedImage

log = logging.getLogger(__name__)


class ModelAnalyzer:
    def __init__(self, classifier: Classifier, clip: ClipEncoder | None) -> None:
        self.classifier = classifier
        self.clip = clip

    @property
    def model_version(self) -> str:
        return self.classifier.model_version

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        pre = self.classifier.preprocess
        decoded = decode_image(
            data, max_bytes=pre.max_image_bytes, max_pixels=pre.max_image_pixels, name=name
        )
        analysis = self.classifier.analyze([decoded])[0]
        heatmaps = {
            f.finding: overlay_png(decoded, analysis.cams[k])
            for k, f in enumerate(analysis.findings)
            if f.positive
        }
        embedding = self.clip.embed_images([decoded])[0] if self.clip is not None else None
        return AnalyzedImage(analysis, heatmaps, embedding)


def build_analyzer(settings: Settings) -> ModelAnalyzer:
    """Load the models named by settings; missing weights fail here, never fall back."""
    return ModelAnalyzer(build_classifier(settings), build_clip(settings))


class ModelQueryEncoder:
    """Embeds ``$similar`` queries that are not stored studies: text (CLIP) or an image."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clip: ClipEncoder | None = None
        self._classifier: Classifier | None = None

    def _clip_encoder(self) -> ClipEncoder:
        if self._clip is None:
            self._clip = build_clip(self._settings)
        return self._clip

    def text(self, text: str) -> npt.NDArray[np.float32]:
        return np.asarray(self._clip_encoder().embed_texts([text])[0], dtype=np.float32)

    def image(self, data: bytes, space: str) -> npt.NDArray[np.float32]:
        if space == "clip":
            return np.asarray(self._clip_encoder().embed_images([data])[0], dtype=np.float32)
        if self._classifier is None:
            self._classifier = build_classifier(self._settings)
        return self._classifier.analyze([data])[0].features
