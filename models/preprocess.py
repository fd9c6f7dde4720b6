"""Decode PNG / JPEG / DICOM into one grayscale image, then into the model's input tensor.

Two stages, so that the heatmap overlay and CLIP see the same pixels as the
classifier:

1. :func:`decode_image` turns bytes into a :class:`DecodedImage`: float32
   ``[H, W]`` in ``[0, 1]`` where 0 is black on screen (DICOM MONOCHROME1 and
   Presentation LUT Shape INVERSE are inverted, the VOI LUT function — LINEAR,
   LINEAR_EXACT or SIGMOID — applied, 16-bit data scaled by its bit depth: the
   PNG's ``sBIT`` or 16, DICOM's BitsStored). Size limits are checked *before* any
   pixel is decoded, and the input gate (:mod:`models.gate`) refuses what is not a
   frontal chest radiograph.
2. :class:`Preprocess` (returned with the model by ``load_classifier``)
   center-crops to a square, resizes with torch's antialiased bilinear
   interpolation (~1 ms, against ~110 ms for the skimage resizer torchxrayvision
   uses) and scales to the model's ``[-1024, 1024]`` range.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from cxr_errors import ImageError, ImageTooLargeError
from models.dicom_display import dicom_display
from models.gate import check_chroma, check_dicom_header, check_pixels, refuse

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DecodedImage",
    "ImageSource",
    "Preprocess",
    "PreprocessSpec",
    "center_square",
    "decode_image",
]

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000

#: A path to a file, or its bytes.
ImageSource: TypeAlias = Path | str | bytes

_DICOM_MAGIC_OFFSET = 128
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class DecodedImage:
    """One grayscale radiograph as displayed: ``[H, W]`` float32 in ``[0, 1]``, 0 = black."""

    pixels: npt.NDArray[np.float32]
    source_format: Literal["png", "jpeg", "dicom", "other"]
    bit_depth: int
    """bits of the stored data the scaling used (8, 10, 12, 14, 15, 16)"""
    name: str = ""

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class PreprocessSpec:
    """What a weights file expects: data, not code branches."""

    input_size: int = 224
    value_range: float = 1024.0
    """input values lie in ``[-value_range, value_range]``"""


def center_square(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the centered square crop, as torchxrayvision's XRayCenterCrop."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


class Preprocess:
    """Decoded image (or bytes / path) → ``[1, S, S]`` float32 tensor in ``[-R, R]``.

    The output is checked (shape, finite, range) so that a bug upstream cannot
    silently feed the model garbage.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        *,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.spec = spec
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels

    def decode(self, source: ImageSource) -> DecodedImage:
        return decode_image(
            source, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels
        )

    def __call__(self, image: DecodedImage | ImageSource) -> torch.Tensor:
        decoded = image if isinstance(image, DecodedImage) else self.decode(image)
        return self.tensor(decoded)

    def tensor(self, decoded: DecodedImage) -> torch.Tensor:
        size, r = self.spec.input_size, self.spec.value_range
        top, left, side = center_square(decoded.height, decoded.width)
        square = decoded.pixels[top : top + side, left : left + side]
        x = torch.from_numpy(np.ascontiguousarray(square))[None, None]
        if side != size:
            # antialias=True matches skimage's anti-aliased resize to within noise
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        x = (x[0] * (2.0 * r) - r).clamp_(-r, r)
        _check_tensor(x, size, r, decoded.name)
        return x


def _check_tensor(x: torch.Tensor, size: int, r: float, name: str) -> None:
    if tuple(x.shape) != (1, size, size):
        raise ImageError(
            f"{name or 'image'}: preprocessed shape {tuple(x.shape)} != (1, {size}, {size})"
        )
    if not bool(torch.isfinite(x).all()):
        raise ImageError(f"{name or 'image'}: preprocessing produced non-finite values")
    if float(x.min()) < -r or float(x.max()) > r:
        raise ImageError(f"{name or 'image'}: preprocessed values outside [-{r:g}, {r:g}]")


# ---------------------------------------------------------------- decoding


def decode_image(
    source: ImageSource,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    name: str | None = None,
    gate: bool = True,
) -> DecodedImage:
    """Decode PNG (8/16-bit, L/RGB/RGBA), JPEG or DICOM into a :class:`DecodedImage`.

    Raises ``ImageTooLargeError`` past ``max_bytes`` / ``max_pixels`` (checked from the
    header, before decoding: a decompression bomb never allocates) and ``ImageError``
    with a specific message for anything that cannot be decoded. With ``gate`` (the
    default) a decodable image that is not a frontal chest radiograph raises
    ``NotARadiographError`` (:mod:`models.gate`); ``gate=False`` is for re-reading pixels
    that already passed (overlays) and for tests of the decoder itself.
    """
    default_name, data = _read(source, max_bytes)
    name = name or default_name
    if len(data) == 0:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    is_dicom = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"
    try:
        with warnings.catch_warnings():
            # pydicom warns about sloppy-but-readable headers (a long UID, an unknown
            # character set): nothing for the caller, and an error where warnings are errors.
            warnings.simplefilter("ignore", UserWarning)
            if is_dicom:
                decoded = _decode_dicom(name, data, max_pixels, gate)
            else:
                decoded = _decode_raster(name, data, max_pixels, gate)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError(f"{name}: decoding needs more memory than there is") from exc
    except Exception as exc:
        # Parsers of untrusted bytes raise whatever their code meets (OSError "Truncated
        # File Read" from PIL.Image.open, struct.error, KeyError, IndexError from pydicom):
        # every one of them means the bytes are not an image we can read.
        kind = "DICOM file" if is_dicom else "image"
        raise ImageError(
            f"{name}: the {kind} is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    if gate:
        check_pixels(decoded.pixels, name)
    return decoded


def _read(source: ImageSource, max_bytes: int) -> tuple[str, bytes]:
    if isinstance(source, bytes):
        if len(source) > max_bytes:
            raise ImageTooLargeError(f"image: {len(source)} bytes exceeds the limit of {max_bytes}")
        return "image", source
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageTooLargeError(f"{path.name}: {size} bytes exceeds the limit of {max_bytes}")
        return path.name, path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{path}: is a directory, not an image file") from exc


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )


def _decode_raster(name: str, data: bytes, max_pixels: int, gate: bool) -> DecodedImage:
    try:
        # We enforce our own pixel limit right below, from the header; Pillow's
        # own bomb check would otherwise warn (an error under pytest) or raise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: image exceeds the pixel limit ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{name}: not a recognised image format (expected PNG, JPEG or DICOM)"
        ) from exc
    with img:
        _check_pixels(name, img.width, img.height, max_pixels)
        fmt = (img.format or "").lower()
        source_format: Literal["png", "jpeg", "dicom", "other"] = (
            "png" if fmt == "png" else "jpeg" if fmt in ("jpeg", "mpo") else "other"
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: image data is truncated or corrupt ({exc})") from exc
        arr = _to_gray_array(name, img, gate)
    # 8-bit data is 8-bit; a 16-bit PNG is scaled by its sBIT chunk when it has one, else by
    # 16 bits — never by the image's own maximum, which would make brightness depend on
    # what the image happens to contain.
    declared = None if arr.dtype == np.uint8 else _png_significant_bits(data)
    bits = 8 if arr.dtype == np.uint8 else declared or 16
    if gate and bits == 16 and declared is None and arr.size and int(arr.max()) < 2**TWELVE_BITS:
        # Scaled by 16 bits this is near-black, which the gate would call near-constant;
        # the likely cause, 12-bit data without its sBIT chunk, is the useful reason.
        raise refuse(
            name,
            f"16-bit PNG whose values all lie below {2**TWELVE_BITS} and that has no sBIT "
            f"chunk: {TWELVE_BITS}-bit data? Declare its depth with an sBIT chunk",
        )
    pixels = (arr.astype(np.float32) / float(2**bits - 1)).clip(0.0, 1.0)
    return DecodedImage(pixels=pixels, source_format=source_format, bit_depth=bits, name=name)


#: The stored depth most 16-bit radiograph exports really hold.
TWELVE_BITS = 12


def _to_gray_array(name: str, img: Image.Image, gate: bool) -> npt.NDArray[np.generic]:
    mode = img.mode
    if mode in ("L", "I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{name}: 32-bit pixel values outside 0..65535 are not supported")
        gray: npt.NDArray[np.generic] = arr if mode == "L" else arr.astype(np.uint16)
        return gray
    if mode in ("RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
        # Radiographs saved as RGB(A) carry the same gray in every channel; the
        # alpha channel carries nothing clinical, so it is dropped.
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
        if gate:
            check_chroma(rgb, name)
        mean: npt.NDArray[np.generic] = np.rint(rgb.mean(axis=2)).astype(np.uint8)
        return mean
    raise ImageError(f"{name}: unsupported pixel mode {mode!r}")


def _png_significant_bits(data: bytes) -> int | None:
    """The grey sample depth a PNG's ``sBIT`` chunk declares (PNG spec 11.3.3.4), or None.

    12-bit data in a 16-bit PNG is scaled by 4095 only when the file says so; Pillow does
    not expose sBIT, so the chunks before the first IDAT are walked here.
    """
    if not data.startswith(_PNG_MAGIC):
        return None
    pos = len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"sBIT" and length >= 1:
            bits = data[pos + 8]
            return int(bits) if 1 <= bits <= 16 else None
        pos += 12 + length
    return None


def _decode_dicom(name: str, data: bytes, max_pixels: int, gate: bool) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageError(f"{name}: unreadable DICOM file ({exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{name}: DICOM file has no pixel data (no PixelData element)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_pixels(name, cols, rows, max_pixels)
    if gate:
        check_dicom_header(ds, name)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageError(
            f"{name}: colour DICOM ({ds.get('PhotometricInterpretation')}) is not a radiograph"
        )
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for codecs and truncation
        raise ImageError(
            f"{name}: cannot decode DICOM pixel data "
            f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}"
        ) from exc
    if raw.ndim == 3:  # multi-frame: the first frame is the radiograph
        raw = raw[0]
    if raw.ndim != 2 or raw.size == 0:
        raise ImageError(f"{name}: DICOM pixel array has shape {raw.shape}, expected 2-D")
    bits = int(ds.get("BitsStored", 8) or 8)
    pixels = dicom_display(ds, raw, bits)
    return DecodedImage(pixels=pixels, source_format="dicom", bit_depth=bits, name=name)
