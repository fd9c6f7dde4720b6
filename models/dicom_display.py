"""DICOM grayscale display pipeline: stored values → what a reading screen shows, in ``[0, 1]``.

Modality LUT (rescale), then the VOI transform (a VOI LUT table, or the first window with its
VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2–3), then the
presentation polarity (MONOCHROME1, or Presentation LUT Shape INVERSE). 0 is black, as in the
MONOCHROME2 films the model was trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["dicom_display", "displayed_inverted"]

FloatArray = npt.NDArray[np.float64]


def displayed_inverted(ds: Any) -> bool:
    """Whether the minimum stored value is displayed white.

    MONOCHROME1 says so, and so does Presentation LUT Shape INVERSE. The DX IOD requires
    INVERSE *with* MONOCHROME1 (PS3.3 C.8.11.6.1.2: both describe the same inversion), so the
    two together invert once; INVERSE on a MONOCHROME2 image inverts it.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "").strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _first(value: Any) -> float:
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _window(values: FloatArray, ds: Any) -> FloatArray | None:
    """The first VOI window applied with its function, or None when there is no usable window."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    c, w = _first(center), _first(width)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID" and w > 0:
        # PS3.3 C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w)) on the output range
        out: FloatArray = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        return out
    if function == "LINEAR_EXACT" and w > 0:
        return ((values - c) / w + 0.5).clip(0.0, 1.0)
    if w > 1:
        # PS3.3 C.11.2.1.2.1 linear window; the -0.5/-1 terms are the standard's
        low = c - 0.5 - (w - 1) / 2
        return ((values - low) / (w - 1)).clip(0.0, 1.0)
    return None


def _stored_range(ds: Any, bits: int) -> tuple[float, float]:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = sorted((lo_raw * slope + intercept, hi_raw * slope + intercept))
    return ends[0], ends[1]


def dicom_display(ds: Any, raw: npt.NDArray[np.generic], bits: int) -> npt.NDArray[np.float32]:
    """``raw`` stored pixel values → displayed ``[H, W]`` float32 in ``[0, 1]``, 0 = black."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # type: ignore[attr-defined]

    if "VOILUTSequence" in ds and "WindowCenter" not in ds:
        # A VOI LUT table is the modality's own display mapping: use it as is.
        values = np.asarray(apply_voi_lut(apply_modality_lut(raw, ds), ds), dtype=np.float64)
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        pixels = (values / float(2**lut_bits - 1)).clip(0.0, 1.0)
    else:
        values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        windowed = _window(values, ds)
        if windowed is None:
            low, high = _stored_range(ds, bits)
            windowed = ((values - low) / max(high - low, 1e-6)).clip(0.0, 1.0)
        pixels = windowed
    if displayed_inverted(ds):
        pixels = 1.0 - pixels
    return pixels.astype(np.float32)
