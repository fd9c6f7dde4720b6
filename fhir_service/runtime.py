"""Wiring: the one place that turns Settings into loaded models.

The CLI (``cxr infer``/``calibrate``), the worker, the ``$similar`` query encoder and the
app's on-demand heatmaps all load through here, so they cannot disagree on weights,
calibration, backend or caches. :class:`LazyModels` is the one lazy holder: a process that
may never need a model (``cxr serve`` answering ``$similar`` by study id) loads none, and one
that needs both loads each once.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cxr_errors import ConfigError
from fhir_service.dicom.web import DicomwebAuth, DicomwebPacs
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.model_card import ModelEvaluation
from fhir_service.settings import Settings
from subscriptions.analyzer import ModelAnalyzer
from subscriptions.pipeline import Analyzer, EmbeddingSink, Pipeline

if TYPE_CHECKING:
    from models.classifier import Classifier
    from models.clip import ClipEncoder

log = logging.getLogger(__name__)

__all__ = [
    "LazyModels",
    "ModelQueryEncoder",
    "build_analyzer",
    "build_classifier",
    "build_clip",
    "build_pipeline",
    "gate_images",
    "gate_labels",
    "model_version_for",
]


def gate_images(settings: Settings) -> list[Path]:
    """The precision gate's images: the NIH samples unless CXR_PRECISION_GATE_DIR says."""
    folder = settings.precision_gate_dir or settings.shared_dir / "data" / "nih-sample"
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def gate_labels(settings: Settings, images: list[Path]) -> dict[str, npt.NDArray[np.bool_]] | None:
    """finding → [N] truth for the gate's ΔAUROC: trained weights and a manifest.csv only."""
    from models.types import NIH_FINDINGS

    manifest = (images[0].parent / "manifest.csv") if images else None
    if settings.model_weights == "untrained" or manifest is None or not manifest.is_file():
        return None
    from fhir_service.ingest.nih import read_manifest

    truth = {rec.image_index: set(rec.finding_labels) for rec in read_manifest(manifest)}
    if not all(p.name in truth for p in images):
        return None
    return {f: np.array([f in truth[p.name] for p in images]) for f in NIH_FINDINGS}


def build_classifier(
    settings: Settings, *, tta: bool | None = None, calibrated: bool = True
) -> Classifier:
    from models.factory import load_classifier

    reduced = settings.model_precision != "fp32"
    images = gate_images(settings) if reduced else []
    return load_classifier(
        settings.model_weights,
        cache_dir=settings.weights_cache_dir,
        weights_sha256=settings.weights_sha256,
        allow_download=settings.weights_download,
        calibration_file=settings.resolved_calibration_file if calibrated else None,
        backend=settings.model_backend,
        onnx_cache_dir=settings.model_cache_path / "onnx",
        tta=settings.tta if tta is None else tta,
        num_threads=settings.model_threads,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        precision=settings.model_precision,
        gate_images=images,
        gate_labels=gate_labels(settings, images) if reduced else None,
    )


def build_clip(settings: Settings) -> ClipEncoder:
    from models.factory import load_clip

    return load_clip(
        settings.clip_model,
        settings.clip_pretrained,
        settings.clip_weights,
        weights_sha256=settings.clip_sha256,
        cache_dir=settings.model_cache_path / "clip",
        backend=settings.clip_backend,
        precision=settings.clip_precision,
        gate_images=gate_images(settings) if settings.clip_precision != "fp32" else [],
        offline=settings.clip_offline,
        num_threads=settings.model_threads,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def build_analyzer(settings: Settings, *, lean: bool = True) -> ModelAnalyzer:
    """The worker's models (missing weights fail here, never fall back).

    ``lean``: once the exported graphs serve, the torch modules are freed (the worker never
    runs them again, nor embeds text), and freed heap pages go back to the system."""
    classifier, clip = build_classifier(settings), build_clip(settings)
    log.info(
        "serving graphs: DenseNet %s %s, CLIP %s %s (CXR_MODEL_PRECISION=%s, "
        "CXR_CLIP_PRECISION=%s)",
        classifier.backend.name.split("-")[0],
        classifier.precision,
        clip.backend,
        clip.precision,
        settings.model_precision,
        settings.clip_precision,
    )
    if lean:
        import gc

        freed = classifier.release_torch() + clip.release_torch()
        gc.collect()
        _trim_heap()
        log.info("lean worker: %.0f MB of torch modules released", freed / 1e6)
    return ModelAnalyzer(classifier, clip)


def _trim_heap() -> None:
    """glibc's malloc_trim: hand freed heap pages back (a no-op elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return


def build_pipeline(
    settings: Settings, fhir: FhirClient, analyzer: Analyzer, store: EmbeddingSink | None
) -> Pipeline:
    """The study job as the worker runs it (bulk inference runs the very same one)."""
    return Pipeline(
        fhir=fhir,
        analyzer=analyzer,
        store=store,
        max_image_bytes=settings.max_image_bytes,
        image_hosts=frozenset(settings.image_hosts),
        image_wait=settings.image_wait,
        pacs=build_pacs(settings),
        pacs_results=settings.pacs_results,
        evaluation=load_evaluation(settings.model_evaluation),
    )


def load_evaluation(path: Path | None) -> ModelEvaluation | None:
    """The evaluation the model card shows (CXR_MODEL_EVALUATION), refused at start-up when
    it is not a readable `cxr evaluate --json` result."""
    if path is None:
        return None
    try:
        return ModelEvaluation.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"CXR_MODEL_EVALUATION={path}: {exc}") from exc


def build_pacs(settings: Settings) -> DicomwebPacs:
    """The PACS the worker reads DICOMweb studies from (the embedded Orthanc by default)."""
    auth = DicomwebAuth(
        token=settings.dicomweb_token,
        username=settings.dicomweb_username,
        password=settings.dicomweb_password,
    )
    return DicomwebPacs(settings.dicomweb_base_url, auth, timeout_s=settings.dicomweb_timeout_s)


def model_version_for(settings: Settings) -> str:
    """The version string the classifier will report, without building a backend."""
    from models.calibration import Calibration
    from models.registry import resolve_weights

    version = resolve_weights(
        settings.model_weights,
        cache_dir=settings.weights_cache_dir,
        sha256=settings.weights_sha256,
        allow_download=settings.weights_download,
    ).model_version
    calibration_file = settings.resolved_calibration_file
    if calibration_file is not None:
        calibration = Calibration.load(calibration_file)
        if not calibration.is_identity:
            version = f"{version}+{calibration.version}"
    return version


class LazyModels:
    """The classifier and CLIP of one process, each loaded on first use, once.

    CLIP costs ~1 s and ~0.5 GB, the classifier less, and a service may need neither; every
    part of ``cxr serve`` that needs a model asks this one holder, so none is loaded twice.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._classifier: Classifier | None = None
        self._clip: ClipEncoder | None = None

    def classifier(self) -> Classifier:
        with self._lock:
            if self._classifier is None:
                self._classifier = build_classifier(self._settings)
            return self._classifier

    def clip(self) -> ClipEncoder:
        with self._lock:
            if self._clip is None:
                self._clip = build_clip(self._settings)
            return self._clip


class ModelQueryEncoder:
    """Embeds ``$similar`` queries that are not stored studies: text (CLIP) or an image."""

    def __init__(self, models: LazyModels) -> None:
        self._models = models

    def text(self, text: str) -> npt.NDArray[np.float32]:
        return np.asarray(self._models.clip().embed_texts([text])[0], dtype=np.float32)

    def clip_version(self) -> str:
        return self._models.clip().model_version

    def image(self, data: bytes, space: str) -> npt.NDArray[np.float32]:
        if space == "clip":
            return np.asarray(self._models.clip().embed_images([data])[0], dtype=np.float32)
        return self._models.classifier().analyze([data])[0].features
