"""Images the app serves, always re-encoded by our own decoder: never the stored bytes.

A ``Media`` declares its own ``contentType``; served as stored, a Media of ``text/html``
with a script would run in the app's origin (stored XSS, issue 13). So every X-ray is
decoded by :func:`models.preprocess.decode_image` (PNG, JPEG, DICOM; size limits checked
from the header before any pixel is decoded) and written out as a fresh 8-bit greyscale PNG,
and every stored heatmap overlay is decoded by Pillow, checked to be a PNG of bounded size,
and written out again as RGBA PNG. Whatever cannot be decoded is an :class:`ImageError`;
a thumbnail of it is a placeholder instead (:func:`placeholder_png`), so a list of similar
cases never fails on one bad image.
"""

from __future__ import annotations

import io
import logging
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from cxr_errors import ImageError, ImageTooLargeError
from models.preprocess import decode_image

log = logging.getLogger(__name__)

PNG = "image/png"
#: Heatmap overlays are drawn at the model's resolution or a little above; anything much
#: larger is not one of ours.
_MAX_OVERLAY_PIXELS = 4096 * 4096


def display_png(data: bytes, *, size: int | None, max_bytes: int, max_pixels: int) -> bytes:
    """The image in ``data`` as a new greyscale PNG, at most ``size`` pixels on its longer
    side when given. Raises ImageError for anything our decoder cannot read."""
    # Showing an image is not reading it: the input gate (models.gate) is for the model.
    decoded = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, gate=False)
    grey = np.rint(decoded.pixels * 255.0).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(grey)  # 2-D uint8: mode "L"
    if size is not None:
        img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def thumbnail_png(data: bytes, *, size: int, max_bytes: int, max_pixels: int) -> tuple[bytes, bool]:
    """``(png, True)`` for a decodable image, ``(placeholder, False)`` for anything else:
    a thumbnail never fails."""
    try:
        return display_png(data, size=size, max_bytes=max_bytes, max_pixels=max_pixels), True
    except ImageError as exc:
        log.info("thumbnail placeholder: %s", exc)
    except Exception as exc:  # a decoder's own failure on hostile bytes: still a placeholder
        log.warning("thumbnail placeholder after an unexpected decoder error: %r", exc)
    return placeholder_png(size), False


def overlay_png(data: bytes) -> bytes:
    """A stored heatmap overlay decoded and written out again as an RGBA PNG."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            if img.format != "PNG":
                raise ImageError(f"a heatmap overlay must be a PNG, not {img.format or 'unknown'}")
            if img.width * img.height > _MAX_OVERLAY_PIXELS:
                raise ImageTooLargeError(f"a {img.width}x{img.height} overlay is too large")
            rgba = img.convert("RGBA")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"the stored heatmap overlay cannot be decoded: {exc}") from exc
    out = io.BytesIO()
    rgba.save(out, format="PNG")
    return out.getvalue()


@lru_cache(maxsize=8)
def placeholder_png(size: int) -> bytes:
    """A neutral grey square with a diagonal cross: "no image to show here"."""
    img = Image.new("L", (size, size), 96)
    draw = ImageDraw.Draw(img)
    draw.line((0, 0, size - 1, size - 1), fill=160, width=max(1, size // 48))
    draw.line((0, size - 1, size - 1, 0), fill=160, width=max(1, size // 48))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
