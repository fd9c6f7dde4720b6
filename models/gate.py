"""The input gate: refuse what is not a frontal chest radiograph before the model reads it.

A DenseNet trained on NIH frontal films scores *anything* it is given — a black square, a
holiday photograph, a CT slice, a lateral view — and the scores look like findings. The gate
runs inside :func:`models.preprocess.decode_image`, so every path that decodes pixels (the
worker, bulk inference, ``cxr infer``, ``cxr evaluate``, ``$similar`` image queries) refuses
the same inputs with the same message, an :class:`~cxr_errors.NotARadiographError`
(an ``InputError``: the pipeline records a failed Task with the message as its reason).

DICOM header rules (:func:`dicom_header_problem`, checked before the pixel data is decoded;
one function so that frontal-image selection in a DICOMweb series can reuse it):

==========================  =================================================================
``Modality``                must be ``DX`` or ``CR`` (projection radiography); anything else —
                            CT, MR, US, a missing value — is refused naming the modality
``BodyPartExamined``        when present and not empty, must be ``CHEST`` (PS3.16 Annex L)
``ViewPosition``            ``PA`` or ``AP``; lateral (``LL``, ``RL``, ``LATERAL``, ``LAT``)
                            → "lateral view: this model reads frontal views"; any other value
                            (oblique, decubitus) is refused too; empty or absent (Type 2) passes
                            and is left to the pixel rules
``SamplesPerPixel``         must be 1 (a colour DICOM is a photograph or a secondary capture)
==========================  =================================================================

Pixel rules (:func:`check_pixels` on the decoded ``[0, 1]`` image, :func:`check_chroma` on
colour rasters before they are made grey). Every threshold is a module constant below; the
margins are what the 56 NIH sample PNGs and the 4 sample DICOM files measure:

* ``MIN_SHORT_SIDE`` = 256 px: the model reads 224 px; below 256 the image is a thumbnail or
  an icon (the samples are ≥ 1024).
* ``MAX_ASPECT`` = 2.0 (long side / short side): detectors are 1:1 to 1:1.3; past 2:1 the
  centre crop would drop more than half of the image (a panoramic strip, a banner).
* ``MIN_DYNAMIC_RANGE`` = 0.10: the 1st–99th percentile spread in display units (0 = black,
  1 = white); black, white and flat grey images have ~0 (the samples ≥ 0.57).
* ``MIN_NEIGHBOUR_CORRELATION`` = 0.5: correlation of horizontally and of vertically
  adjacent pixels (the smaller of the two), measured on the image subsampled to ≤ 1024 px.
  Anatomy is smooth (the samples ≥ 0.987); white noise is ~0.
* ``MAX_CHROMATIC_FRACTION`` = 0.05 of pixels with chroma above ``CHROMA_LEVEL`` = 0.10 of
  full scale (chroma = max − min of R, G, B): a radiograph saved as RGB has chroma 0 in every
  pixel (the samples' RGBA files: 0), a coloured annotation covers a few per cent at most, a
  colour photograph most of its pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from cxr_errors import NotARadiographError

__all__ = [
    "CHROMA_LEVEL",
    "FRONTAL_VIEWS",
    "LATERAL_VIEWS",
    "MAX_ASPECT",
    "MAX_CHROMATIC_FRACTION",
    "MIN_DYNAMIC_RANGE",
    "MIN_NEIGHBOUR_CORRELATION",
    "MIN_SHORT_SIDE",
    "RADIOGRAPH_MODALITIES",
    "check_chroma",
    "check_dicom_header",
    "check_pixels",
    "dicom_header_problem",
    "pixel_problem",
    "refuse",
]

RADIOGRAPH_MODALITIES = frozenset({"DX", "CR"})
CHEST_BODY_PARTS = frozenset({"CHEST"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT"})

MIN_SHORT_SIDE = 256
MAX_ASPECT = 2.0
MIN_DYNAMIC_RANGE = 0.10
MIN_NEIGHBOUR_CORRELATION = 0.5
CHROMA_LEVEL = 0.10
MAX_CHROMATIC_FRACTION = 0.05
_CORRELATION_MAX_SIDE = 1024

LATERAL_REASON = "lateral view: this model reads frontal views"


def refuse(name: str, reason: str) -> NotARadiographError:
    """The gate's error: the reason first (it becomes the failed Task's text), then the file."""
    return NotARadiographError(f"not a frontal chest radiograph: {reason} [{name}]")


def _text(ds: Any, keyword: str) -> str | None:
    if keyword not in ds:
        return None
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().upper()


def dicom_header_problem(ds: Any) -> str | None:
    """Why a DICOM data set is not a frontal chest radiograph, or None if its header is fine.

    ``ds`` is a ``pydicom.Dataset`` (read without pixel data is enough). The one place the
    DICOM rules live, for the decoder here and for picking the frontal image of a series.
    """
    modality = _text(ds, "Modality")
    if not modality:
        return "DICOM Modality is missing (this model reads DX or CR radiographs)"
    if modality not in RADIOGRAPH_MODALITIES:
        return f"DICOM Modality {modality} (this model reads DX or CR radiographs)"
    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part not in CHEST_BODY_PARTS:
        return f"DICOM BodyPartExamined {body_part} (this model reads CHEST)"
    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        return f"{LATERAL_REASON} (DICOM ViewPosition {view})"
    if view and view not in FRONTAL_VIEWS:
        return f"DICOM ViewPosition {view} (this model reads PA or AP views)"
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        photometric = _text(ds, "PhotometricInterpretation") or "?"
        return f"colour DICOM ({photometric}, {samples} samples per pixel)"
    return None


def check_dicom_header(ds: Any, name: str) -> None:
    problem = dicom_header_problem(ds)
    if problem is not None:
        raise refuse(name, problem)


def check_chroma(rgb: npt.NDArray[np.generic], name: str, full_scale: float = 255.0) -> None:
    """Refuse a colour photograph: ``rgb`` is ``[H, W, 3]`` in ``0..full_scale``."""
    if rgb.size == 0:
        return
    chroma = rgb.max(axis=2).astype(np.float32) - rgb.min(axis=2).astype(np.float32)
    fraction = float(np.mean(chroma > CHROMA_LEVEL * full_scale))
    if fraction > MAX_CHROMATIC_FRACTION:
        raise refuse(
            name,
            f"colour image ({fraction:.0%} of pixels have chroma above "
            f"{CHROMA_LEVEL:.0%} of full scale; the limit is {MAX_CHROMATIC_FRACTION:.0%})",
        )


def _neighbour_correlation(x: npt.NDArray[np.float32]) -> float:
    step = max(1, math.ceil(max(x.shape) / _CORRELATION_MAX_SIDE))
    sub = x[::step, ::step].astype(np.float64)
    values = []
    for a, b in ((sub[:, :-1], sub[:, 1:]), (sub[:-1, :], sub[1:, :])):
        a, b = a - a.mean(), b - b.mean()
        denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
        values.append(float((a * b).sum()) / denom if denom > 0 else 0.0)
    return min(values)


def pixel_problem(pixels: npt.NDArray[np.float32]) -> str | None:
    """Why a decoded ``[H, W]`` image in ``[0, 1]`` is not a radiograph, or None."""
    height, width = pixels.shape
    short, long = min(height, width), max(height, width)
    if short < MIN_SHORT_SIDE:
        return f"too small ({width}x{height} px; the short side must be at least {MIN_SHORT_SIDE})"
    if long / short > MAX_ASPECT:
        ratio = long / short
        return f"extreme aspect ratio {ratio:.2f}:1 ({width}x{height}; at most {MAX_ASPECT:g}:1)"
    low, high = np.percentile(pixels, [1.0, 99.0])
    spread = float(high - low)
    if spread < MIN_DYNAMIC_RANGE:
        return (
            f"near-constant image (1st–99th percentile spread {spread:.3f} of full scale; "
            f"at least {MIN_DYNAMIC_RANGE:g})"
        )
    correlation = _neighbour_correlation(pixels)
    if correlation < MIN_NEIGHBOUR_CORRELATION:
        return (
            f"no anatomy, pixels look like noise (neighbour correlation {correlation:.2f}; "
            f"at least {MIN_NEIGHBOUR_CORRELATION:g})"
        )
    return None


def check_pixels(pixels: npt.NDArray[np.float32], name: str) -> None:
    problem = pixel_problem(pixels)
    if problem is not None:
        raise refuse(name, problem)
