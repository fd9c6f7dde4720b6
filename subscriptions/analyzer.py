"""The model layer behind the job's :class:`~subscriptions.pipeline.Analyzer` interface.

One DenseNet pass (scores, CAMs, features) and CLIP (image embedding for similar-case search)
per batch; heatmaps are rendered for positive findings only. The models come in from the
roof (``fhir_service.runtime``) through the two Protocols below: nothing here loads weights
or reads settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cxr_errors import InputError
from models.heatmap import overlay_pngs
from models.preprocess import DecodedImage, decode_image
from models.types import ImageAnalysis
from subscriptions.pipeline import AnalyzedImage


class ImageLimits(Protocol):
    max_image_bytes: int
    max_image_pixels: int


class ScoringModel(Protocol):
    """What the job needs of the classifier (``models.classifier.Classifier``)."""

    @property
    def model_version(self) -> str: ...

    @property
    def preprocess(self) -> ImageLimits: ...

    def analyze(
        self,
        images: Sequence[DecodedImage],
        *,
        batch_size: int = ...,
    ) -> list[ImageAnalysis]: ...


class EmbeddingModel(Protocol):
    """What the job needs of CLIP (``models.clip.ClipEncoder``)."""

    @property
    def model_version(self) -> str: ...

    def embed_images(
        self,
        images: Sequence[DecodedImage],
        *,
        batch_size: int = ...,
    ) -> npt.NDArray[np.float32]: ...


class ModelAnalyzer:
    """``analyze`` (the worker, one image) and ``analyze_many`` (bulk inference) are one code
    path: the single image is a batch of one."""

    def __init__(self, classifier: ScoringModel, clip: EmbeddingModel | None) -> None:
        self.classifier = classifier
        self.clip = clip
        self.last_timings: dict[str, float] = {}
        """seconds per stage of the last ``analyze_many`` (decode, densenet, clip, overlays)"""

    @property
    def model_version(self) -> str:
        return self.classifier.model_version

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        result = self.analyze_many([(data, name)])[0]
        if isinstance(result, InputError):
            raise result
        return result

    def _decode(self, data: bytes, name: str) -> DecodedImage | InputError:
        limits = self.classifier.preprocess
        try:
            return decode_image(
                data,
                max_bytes=limits.max_image_bytes,
                max_pixels=limits.max_image_pixels,
                name=name,
            )
        except InputError as exc:
            return exc

    def analyze_many(self, images: Sequence[tuple[bytes, str]]) -> list[AnalyzedImage | InputError]:
        """Decode each image (a bad one gets its error in its place), then one batched
        DenseNet pass and one batched CLIP pass over the decodable ones."""
        clock = time.perf_counter
        t0 = clock()
        decoded = [self._decode(data, name) for data, name in images]
        good = [d for d in decoded if isinstance(d, DecodedImage)]
        if not good:
            return [d for d in decoded if isinstance(d, InputError)]
        batch = len(good)
        t1 = clock()
        analyses = iter(self.classifier.analyze(good, batch_size=batch))
        t2 = clock()
        embeddings = (
            iter(self.clip.embed_images(good, batch_size=batch)) if self.clip is not None else None
        )
        t3 = clock()
        out: list[AnalyzedImage | InputError] = []
        for item in decoded:
            if isinstance(item, InputError):
                out.append(item)
                continue
            analysis = next(analyses)
            published = [k for k, f in enumerate(analysis.findings) if f.positive]
            pngs = overlay_pngs(item, analysis.cams[published]) if published else []
            heatmaps = {
                analysis.findings[k].finding: png for k, png in zip(published, pngs, strict=True)
            }
            embedding = next(embeddings) if embeddings is not None else None
            clip_version = self.clip.model_version if self.clip is not None else None
            out.append(AnalyzedImage(analysis, heatmaps, embedding, clip_version))
        self.last_timings = {
            "decode": t1 - t0,
            "densenet": t2 - t1,
            "clip": t3 - t2,
            "overlays": clock() - t3,
        }
        return out
