"""Factories: each returns a model *together with* its preprocessing, so the two cannot drift.

:func:`load_classifier` (the DenseNet: weights → preprocessing → calibration → backend) and
:func:`load_clip` (open_clip: weights → tokenizer, preprocessing, prompt vectors). The
classes they build (:mod:`models.classifier`, :mod:`models.clip`) know nothing of where their
weights came from; the registry (:mod:`models.registry`) knows nothing of the classes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from cxr_errors import ConfigError, ModelError
from models.calibration import Calibration
from models.classifier import Classifier
from models.clip import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    ClipEncoder,
    ClipPreprocess,
    hub_reachable,
    set_hub_offline,
)
from models.preprocess import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from models.reduced import Requested
from models.registry import (
    DEFAULT_WEIGHTS,
    UNTRAINED,
    UNTRAINED_SEED,
    BackendName,
    file_sha256,
    resolve_weights,
    state_dict_sha256,
)

__all__ = ["load_classifier", "load_clip"]


def load_classifier(
    weights: str = DEFAULT_WEIGHTS,
    *,
    cache_dir: Path | None = None,
    weights_sha256: str | None = None,
    allow_download: bool = True,
    calibration_file: Path | None = None,
    backend: BackendName = "onnx",
    onnx_cache_dir: Path | None = None,
    tta: bool = True,
    num_threads: int | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    precision: Requested = "fp32",
    gate_images: Sequence[Path] = (),
    gate_labels: Mapping[str, npt.NDArray[np.bool_]] | None = None,
) -> Classifier:
    """Weights + preprocessing + calibration + backend, ready for ``analyze``.

    ``weights``: a registry name, a file path or ``untrained``. ``calibration_file``:
    a file written by ``cxr calibrate`` (identity calibration when None).
    ``onnx_cache_dir``: where the exported graph is cached (exported in memory
    at every start when None). ``precision`` bf16/int8: the graph serves only after the
    precision gate passed on ``gate_images`` (see :mod:`models.precision_gate`); ``auto``:
    OpenVINO bf16 where it passed, else fp32 (:func:`models.reduced.auto_precision`).
    """
    loaded = resolve_weights(
        weights, cache_dir=cache_dir, sha256=weights_sha256, allow_download=allow_download
    )
    calibration = Calibration.load(calibration_file) if calibration_file is not None else None
    return Classifier(
        loaded,
        backend=backend,
        onnx_cache_dir=onnx_cache_dir,
        calibration=calibration,
        tta=tta,
        num_threads=num_threads,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        precision=precision,
        gate_images=gate_images,
        gate_labels=gate_labels,
    )


@dataclass(frozen=True)
class _ClipSource:
    """Where CLIP weights come from: a pretrained tag, a checked local file, or untrained."""

    untrained: bool
    source: str | None
    """a local file path or the pretrained tag; None when untrained"""
    digest: str
    """the file's sha256; '' until the state dict is hashed (tag, untrained)"""


def _clip_source(weights: str | None, pretrained: str, weights_sha256: str | None) -> _ClipSource:
    if weights == UNTRAINED:
        return _ClipSource(True, None, "")
    if weights is None:
        return _ClipSource(False, pretrained, "")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"CLIP weights file {path} does not exist (CXR_CLIP_WEIGHTS); give a path to an "
            "open_clip checkpoint, unset it to use the pretrained tag, or use 'untrained'"
        )
    digest = file_sha256(path)
    if weights_sha256 is not None and digest != weights_sha256.lower():
        raise ConfigError(
            f"CLIP weights file {path} has sha256 {digest}, expected {weights_sha256.lower()}"
        )
    return _ClipSource(False, str(path), digest)


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    # open_clip logs "Model initialized randomly" at WARNING on the root logger;
    # in untrained mode that is the point, and our version string says so.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _create_clip(
    model_name: str, pretrained: str, src: _ClipSource, hub_cache_dir: Path | None, offline: bool
) -> Any:
    import open_clip

    try:
        if src.untrained:
            with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
                torch.manual_seed(UNTRAINED_SEED)
                model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None)
        else:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name,
                pretrained=src.source,
                cache_dir=str(hub_cache_dir) if hub_cache_dir else None,
            )
    except RuntimeError as exc:
        if src.source is not None and src.source == pretrained:
            raise ConfigError(
                f"CLIP weights {model_name}/{pretrained} are not available: {exc}. "
                + ("No network: " if offline else "")
                + "download them once where there is network (they land in the Hugging Face "
                "cache), or set CXR_CLIP_WEIGHTS to a local checkpoint file, or "
                "CXR_CLIP_WEIGHTS=untrained for an explicit untrained demo model"
            ) from exc
        raise ModelError(f"CLIP model {model_name} could not be created: {exc}") from exc
    except Exception as exc:
        raise ModelError(f"CLIP model {model_name} could not be created: {exc}") from exc
    return model


def _clip_preprocess(model: Any) -> ClipPreprocess:
    cfg = getattr(model.visual, "preprocess_cfg", {})
    size = cfg.get("size", 224)
    return ClipPreprocess(
        int(size[0] if isinstance(size, tuple | list) else size),
        cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
        cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
    )


def load_clip(
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str = DEFAULT_CLIP_PRETRAINED,
    weights: str | None = None,
    *,
    weights_sha256: str | None = None,
    hub_cache_dir: Path | None = None,
    cache_dir: Path | None = None,
    backend: BackendName = "torch",
    offline: bool | None = None,
    num_threads: int | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    precision: Requested = "fp32",
    gate_images: Sequence[Path] = (),
) -> ClipEncoder:
    """Load an open_clip model with its preprocessing and prompt vectors.

    ``weights``: None (the ``pretrained`` tag), a file path, or ``untrained``.
    ``cache_dir``: where prompt embeddings and the ONNX image tower are cached.
    ``offline``: None probes the hub once; True/False decide. Without network, open_clip's hub
    client retries for ~46 s before failing, so offline mode is switched on first.
    """
    src = _clip_source(weights, pretrained, weights_sha256)
    if weights is not None:
        offline = True if offline is None else offline
    if offline is None:
        offline = not hub_reachable()
    if offline:
        set_hub_offline()
    import open_clip

    model = _create_clip(model_name, pretrained, src, hub_cache_dir, offline)
    digest = src.digest or state_dict_sha256(model)
    if src.untrained:
        version = f"untrained-{model_name}-seed{UNTRAINED_SEED}@{digest[:12]}"
    else:
        label = pretrained if src.source == pretrained else Path(str(src.source)).name
        version = f"{model_name}/{label}@{digest[:12]}"
    return ClipEncoder(
        model,
        open_clip.get_tokenizer(model_name),
        _clip_preprocess(model),
        model_version=version,
        untrained=src.untrained,
        weights_sha256=digest,
        backend=backend,
        cache_dir=cache_dir,
        num_threads=num_threads,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        precision=precision,
        gate_images=gate_images,
    )
