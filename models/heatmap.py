"""Render a class activation map as a PNG overlay on the radiograph.

The CAM covers the centre square the model saw, so the overlay is drawn on
that square. The PNG is palette-quantised: a 512² overlay stays well under the
~100 KB that a FHIR ``Media``/``Attachment`` can comfortably carry inline.
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image

from models.preprocess import DecodedImage, center_square

__all__ = ["DEFAULT_OVERLAY_SIZE", "colormap", "overlay_png", "overlay_pngs", "upsample_cam"]

DEFAULT_OVERLAY_SIZE = 512

# A perceptually ordered blue → cyan → yellow → red ramp (anchor points of "turbo"-like maps).
_ANCHORS = np.array(
    [
        [0.19, 0.07, 0.23],
        [0.16, 0.47, 0.93],
        [0.10, 0.85, 0.72],
        [0.64, 0.99, 0.24],
        [0.98, 0.73, 0.22],
        [0.88, 0.27, 0.05],
        [0.48, 0.02, 0.01],
    ]
)


def colormap(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """[H,W] in [0,1] → [H,W,3] RGB in [0,1]."""
    pos = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb: npt.NDArray[np.float32] = (_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).astype(
        np.float32
    )
    return rgb


def upsample_cam(cam: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay_png(
    image: DecodedImage,
    cam: npt.NDArray[np.float32],
    *,
    size: int = DEFAULT_OVERLAY_SIZE,
    alpha: float = 0.45,
    max_bytes: int = 100_000,
) -> bytes:
    """PNG bytes: the centre square of ``image`` at ``size`` px with ``cam`` [h,w] on top.

    At most ``max_bytes`` for 512 px in practice (the palette shrinks until it fits).

    The map is min–max normalised per image (a CAM shows *where*, not *how
    much*; the probability is reported next to it), and its weakest half is
    left transparent so the anatomy stays readable.
    """
    top, left, side = center_square(image.height, image.width)
    square = torch.from_numpy(
        np.ascontiguousarray(image.pixels[top : top + side, left : left + side])
    )
    gray = F.interpolate(square[None, None], size=(size, size), mode="bilinear", antialias=True)[
        0, 0
    ].numpy()
    heat = upsample_cam(cam, size)
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    weight = (alpha * np.clip((norm - 0.5) * 2.0, 0.0, 1.0))[..., None]
    rgb = gray[..., None] * (1 - weight) + colormap(norm) * weight
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    # Radiograph grain compresses poorly; fewer palette colours until it fits.
    data = b""
    for colors in (64, 40, 24, 16):
        quantised = img.quantize(
            colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        buf = io.BytesIO()
        quantised.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
        if len(data) <= max_bytes:
            break
    return data


#: The fixed palette of :func:`overlay_pngs`: ``_GRAYS`` gray levels where the map is
#: transparent, and (gray level, heat level) blends where it shows.
_GRAYS = 32
_GRAY_STEPS = 14
_HEAT_STEPS = 16


def _palette(alpha: float) -> tuple[bytes, npt.NDArray[np.float32]]:
    """The PIL palette bytes, and the heat levels' normalised values."""
    grays = np.linspace(0.0, 1.0, _GRAYS)
    entries = [np.repeat(grays[:, None], 3, axis=1)]
    gray_steps = np.linspace(0.0, 1.0, _GRAY_STEPS)
    heat = 0.5 + (np.arange(_HEAT_STEPS) + 0.5) / (2 * _HEAT_STEPS)  # levels above the half
    colours = colormap(heat.astype(np.float32))
    weight = alpha * np.clip((heat - 0.5) * 2.0, 0.0, 1.0)
    for h in range(_HEAT_STEPS):
        blend = gray_steps[:, None] * (1 - weight[h]) + colours[h][None, :] * weight[h]
        entries.append(blend)
    table = np.concatenate(entries)
    assert len(table) <= 256
    raw = (np.clip(table, 0, 1) * 255 + 0.5).astype(np.uint8).tobytes()
    return raw, heat.astype(np.float32)


_PALETTE, _HEAT_LEVELS = _palette(0.45)


def _gray_square(image: DecodedImage, size: int) -> npt.NDArray[np.float32]:
    top, left, side = center_square(image.height, image.width)
    square = torch.from_numpy(
        np.ascontiguousarray(image.pixels[top : top + side, left : left + side])
    )
    out: npt.NDArray[np.float32] = F.interpolate(
        square[None, None], size=(size, size), mode="bilinear", antialias=True
    )[0, 0].numpy()
    return out


def overlay_pngs(
    image: DecodedImage,
    cams: npt.NDArray[np.float32],
    *,
    size: int = DEFAULT_OVERLAY_SIZE,
    compress_level: int = 6,
) -> list[bytes]:
    """One PNG per CAM in ``cams`` [K,h,w], drawn as :func:`overlay_png` draws them, cheaper.

    The radiograph is cropped and resized once for all K overlays, all maps are upsampled in
    one call, and each overlay is indexed straight into a fixed 256-entry palette (32 grays
    where the map is transparent; 14 grays × 16 heat levels where it shows), so there is no
    per-image colour quantisation and each PNG is encoded exactly once.
    """
    if cams.ndim != 3 or len(cams) == 0:
        return []
    gray = _gray_square(image, size)
    heat = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32))[None],
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )[0].numpy()
    lo = heat.min(axis=(1, 2), keepdims=True)
    span = heat.max(axis=(1, 2), keepdims=True) - lo
    norm = np.where(span > 0, (heat - lo) / np.where(span > 0, span, 1.0), 0.0)
    plain = np.rint(gray * (_GRAYS - 1)).astype(np.uint8)
    blended_gray = np.rint(gray * (_GRAY_STEPS - 1)).astype(np.int32)
    level = np.clip(((norm - 0.5) * 2 * _HEAT_STEPS).astype(np.int32), 0, _HEAT_STEPS - 1)
    shows = norm > 0.5
    out = []
    for k in range(len(cams)):
        index = np.where(shows[k], _GRAYS + level[k] * _GRAY_STEPS + blended_gray, plain).astype(
            np.uint8
        )
        img = Image.fromarray(index, "P")
        img.putpalette(_PALETTE)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=compress_level)
        out.append(buf.getvalue())
    return out
