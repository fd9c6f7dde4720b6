"""Settings wired into the model layer: the one place that turns ``CXR_*`` into loaded models.

The CLI (``cxr infer``/``calibrate``), the worker and the ``$similar`` query encoder all load
through here, so they cannot disagree on weights, calibration, backend or caches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fhir_service.settings import Settings

if TYPE_CHECKING:
    from models.classifier import Classifier
    from models.clip import ClipEncoder


def build_classifier(
    settings: Settings, *, tta: bool | None = None, calibrated: bool = True
) -> Classifier:
    from models.registry import load_classifier

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
    )


def build_clip(settings: Settings) -> ClipEncoder:
    from models.clip import load_clip

    return load_clip(
        settings.clip_model,
        settings.clip_pretrained,
        settings.clip_weights,
        weights_sha256=settings.clip_sha256,
        cache_dir=settings.model_cache_path / "clip",
        backend=settings.clip_backend,
        offline=settings.clip_offline,
        num_threads=settings.model_threads,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


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
