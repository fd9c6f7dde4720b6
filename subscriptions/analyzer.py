"""The model layer behind the job's :class:`~subscriptions.pipeline.Analyzer` interface.

Loaded once per worker process: the DenseNet (one pass → scores, CAMs, features) and CLIP
(image embedding for similar-case search). Heatmaps are rendered for positive findings only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cxr_errors import InputError
from fhir_service.model_config import build_classifier, build_clip
from fhir_service.settings import Settings
from models.classifier import Classifier
from models.clip import ClipEncoder
from models.heatmap import overlay_png
from models.preprocess import DecodedImage, decode_image
from subscriptions.pipeline import AnalyzedImage

log = logging.getLogger(__name__)


class ModelAnalyzer:
    """``analyze`` (the worker, one image) and ``analyze_many`` (bulk inference) are one code
    path: the single image is a batch of one."""

    def __init__(self, classifier: Classifier, clip: ClipEncoder | None) -> None:
        self.classifier = classifier
        self.clip = clip

    @property
    def model_version(self) -> str:
        return self.classifier.model_version

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        result = self.analyze_many([(data, name)])[0]
        if isinstance(result, InputError):
            raise result
        return result

    def analyze_many(self, images: Sequence[tuple[bytes, str]]) -> list[AnalyzedImage | InputError]:
        """Decode each image (a bad one gets its error in its place), then one batched
        DenseNet pass and one batched CLIP pass over the decodable ones."""
        pre = self.classifier.preprocess
        decoded: list[DecodedImage | InputError] = []
        for data, name in images:
            try:
                decoded.append(
                    decode_image(
                        data,
                        max_bytes=pre.max_image_bytes,
                        max_pixels=pre.max_image_pixels,
                        name=name,
                    )
                )
            except InputError as exc:
                decoded.append(exc)
        good = [d for d in decoded if isinstance(d, DecodedImage)]
        if not good:
            return [d for d in decoded if isinstance(d, InputError)]
        batch = len(good)
        analyses = iter(self.classifier.analyze(good, batch_size=batch))
        embeddings = (
            iter(self.clip.embed_images(good, batch_size=batch)) if self.clip is not None else None
        )
        out: list[AnalyzedImage | InputError] = []
        for item in decoded:
            if isinstance(item, InputError):
                out.append(item)
                continue
            analysis = next(analyses)
            heatmaps = {
                f.finding: overlay_png(item, analysis.cams[k])
                for k, f in enumerate(analysis.findings)
                if f.positive
            }
            embedding = next(embeddings) if embeddings is not None else None
            out.append(AnalyzedImage(analysis, heatmaps, embedding))
        return out


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
