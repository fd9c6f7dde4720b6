"""Fuzzing the decoder: whatever the bytes, ``decode_image`` returns an image or raises the
project's ``ImageError`` — never anything else, which the job could not classify as bad input.

Real inputs: an NIH PNG, the JPEG stream inside the SIIM DICOM (a real baseline JPEG), a
16-bit PNG made from the NIH image, and every DICOM file in ``../shared/data/dicom``. Each is

* truncated at 20+ offsets, every PNG chunk boundary and every JPEG marker segment boundary
  (DICOM: the preamble, the magic, every header element, the pixel data element) included;
* mutated 50 times in each header region (seeded: hypothesis derandomized, so every run
  tries the same cases): bytes set, bits flipped, bytes inserted or deleted, length fields
  set to 0 or to their maximum.

No servers; the expensive part is the DICOM files whose mutated headers still decode the
whole image (the JPEG 2000 one above all).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_errors import ImageError
from fhir_service.settings import Settings
from models.preprocess import DecodedImage, decode_image

#: ``../shared`` beside the repository, or ``CXR_SHARED_DIR`` (the settings resolve both).
SHARED = Settings().shared_dir / "data"
NIH_PNG = "nih-sample/00000001_000.png"
SIIM = "dicom/siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DICOMS = sorted(p.name for p in (SHARED / "dicom").glob("*.dcm"))

#: Distinct mutations per header region (the issue asks for at least 50); hypothesis is asked
#: for a few more, since different edit lists can give the same bytes.
EXAMPLES = 50
_ASKED = 62


@dataclass(frozen=True)
class Sample:
    data: bytes
    boundaries: tuple[int, ...]
    """structure boundaries (chunk / marker segment / element starts) for truncation"""
    regions: dict[str, tuple[int, int]]
    """header regions [start, end) for mutation"""


# --- the inputs and their structure -------------------------------------------------------


def _shared(rel: str) -> bytes:
    path = SHARED / rel
    if not path.is_file():
        pytest.fail(f"shared test data missing: {path}")
    return path.read_bytes()


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, data length) of every chunk."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((pos, kind, length))
        pos += 12 + length
    return out


def _png_sample(data: bytes) -> Sample:
    chunks = _png_chunks(data)
    boundaries = {8, len(data)}
    for pos, _kind, length in chunks:
        boundaries |= {pos, pos + 4, pos + 8, pos + 8 + length}
    idat = next(pos for pos, kind, _ in chunks if kind == b"IDAT")
    regions = {"signature": (0, 8), "IHDR": (8, 33), "IDAT header + zlib header": (idat, idat + 24)}
    if idat - 33 >= 4:
        regions["chunks before IDAT"] = (33, idat)
    return Sample(data, tuple(sorted(boundaries)), regions)


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, marker, segment length incl. marker) up to and including SOS."""
    out, pos = [(0, 0xD8, 2)], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        out.append((pos, marker, length + 2))
        pos += length + 2
        if marker == 0xDA:
            break
    return out


def _jpeg_sample(data: bytes) -> Sample:
    segments = _jpeg_segments(data)
    boundaries = {len(data)}
    for pos, _marker, length in segments:
        boundaries |= {pos, pos + 2, pos + length}
    eoi = data.rfind(b"\xff\xd9")
    boundaries |= {eoi, eoi + 2}
    names = {0xDB: "DQT", 0xC0: "SOF0", 0xC4: "DHT", 0xDA: "SOS"}
    regions: dict[str, tuple[int, int]] = {}
    for pos, marker, length in segments[1:]:
        name = names.get(marker, f"APP/other {marker:#x}")
        if name not in regions:  # the first segment of each kind
            regions[name] = (pos, pos + length)
    # SOI is two bytes: mutated together with the segment after it
    regions["SOI + next segment"] = (0, segments[1][0] + segments[1][2])
    return Sample(data, tuple(sorted(boundaries)), regions)


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}  # fmt: skip
_PIXEL_DATA = b"\xe0\x7f\x10\x00"


def _dicom_elements(data: bytes) -> tuple[list[int], int, int]:
    """Element start offsets (explicit VR little endian, as all four files are) up to the
    pixel data element; the end of the file meta group; the pixel data element's offset."""
    starts, pos, meta_end = [], 132, 0
    while pos + 8 <= len(data):
        group = struct.unpack("<H", data[pos : pos + 2])[0]
        if group != 2 and not meta_end:
            meta_end = pos
        if data[pos : pos + 4] == _PIXEL_DATA:
            return starts, meta_end, pos
        starts.append(pos)
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack("<I", data[pos + 8 : pos + 12])[0]
            head = 12
        else:
            length = struct.unpack("<H", data[pos + 6 : pos + 8])[0]
            head = 8
        if length == 0xFFFFFFFF:  # a sequence of undefined length: skip to its delimiter
            end = data.index(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", pos + head)
            pos = end + 8
        else:
            pos += head + length
    raise AssertionError("no PixelData element found")


def _dicom_sample(data: bytes) -> Sample:
    starts, meta_end, pixel = _dicom_elements(data)
    boundaries = {0, 64, 128, 130, 132, meta_end, pixel, pixel + 12, pixel + 20, len(data)}
    boundaries |= set(starts)
    # and through the pixel data, so a cut image is tried at several depths
    boundaries |= {pixel + (len(data) - pixel) * k // 8 for k in range(1, 8)}
    regions = {
        # the preamble is free for any use: mutating more of it would test nothing
        "DICM magic": (124, 144),
        "file meta group": (132, meta_end),
        "dataset header": (meta_end, pixel),
        "pixel data element header": (pixel, min(len(data), pixel + 28)),
    }
    return Sample(data, tuple(sorted(boundaries)), regions)


@cache
def sample(name: str) -> Sample:
    if name == "png":
        return _png_sample(_shared(NIH_PNG))
    if name == "png16":
        return _png_sample(_png16())
    if name == "jpeg":
        return _jpeg_sample(_siim_jpeg())
    return _dicom_sample(_shared(f"dicom/{name}"))


def _png16() -> bytes:
    """The NIH image as a 16-bit PNG using the full 16 bits (without an sBIT chunk the
    decoder scales by 16 bits, so 12-bit values would read as a near-constant image)."""
    gray = np.asarray(Image.open(io.BytesIO(_shared(NIH_PNG))).convert("L"), dtype=np.uint16)
    image = Image.fromarray(gray * 257)  # uint16: Pillow's "I;16"
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _siim_jpeg() -> bytes:
    """The baseline JPEG stream the SIIM chest X-ray carries in its encapsulated pixel data."""
    import pydicom
    from pydicom.encaps import generate_fragmented_frames

    ds = pydicom.dcmread(io.BytesIO(_shared(SIIM)))
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    assert frame[:2] == b"\xff\xd8"
    return frame


INPUTS = ["png", "png16", "jpeg", *DICOMS]


# --- the property -------------------------------------------------------------------------


def _decodes_or_image_error(data: bytes, what: str) -> None:
    try:
        decoded = decode_image(data, name=what)
    except ImageError as exc:
        # the decoder's messages start with the name, the input gate's end with it
        assert what in exc.message, exc.message
        return
    except BaseException as exc:
        pytest.fail(f"{what}: {type(exc).__name__} escaped decode_image: {exc!r}")
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.ndim == 2 and decoded.pixels.dtype == np.float32
    assert bool(np.isfinite(decoded.pixels).all())


@pytest.mark.parametrize("name", INPUTS)
def test_the_real_inputs_decode(name: str) -> None:
    decoded = decode_image(sample(name).data)
    assert decoded.width >= 512 and decoded.height >= 512


@pytest.mark.parametrize("name", INPUTS)
def test_truncated_at_every_boundary_and_more(name: str) -> None:
    s = sample(name)
    cuts = set(s.boundaries)
    # evenly spaced cuts on top, so every input gets at least 20 (PNG / JPEG get more)
    cuts |= {len(s.data) * k // 24 for k in range(1, 24)}
    cuts = {c for c in cuts if 0 <= c < len(s.data)}
    assert len(cuts) >= 20
    for cut in sorted(cuts):
        _decodes_or_image_error(s.data[:cut], f"{name}[:{cut}]")


def test_structure_is_found() -> None:
    png = sample("png")
    assert len(_png_chunks(png.data)) == 13 and set(png.regions) >= {"IHDR", "signature"}
    jpeg = sample("jpeg")
    assert {"SOI + next segment", "DQT", "SOF0", "DHT", "SOS"} <= set(jpeg.regions)
    for name in DICOMS:
        assert set(sample(name).regions) == {
            "DICM magic",
            "file meta group",
            "dataset header",
            "pixel data element header",
        }
    assert len(DICOMS) == 4


# One edit: (kind, position as a fraction of the region, a byte value).
_edit = st.tuples(
    st.sampled_from(["set", "flip", "insert", "delete", "length0", "lengthmax"]),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    st.integers(min_value=0, max_value=255),
)


def _mutate(data: bytes, region: tuple[int, int], edits: list[tuple[str, float, int]]) -> bytes:
    b = bytearray(data)
    start, end = region
    for kind, where, value in edits:
        at = start + int(where * max(1, end - start))
        at = min(at, len(b) - 1)
        if kind == "set":
            b[at] = value
        elif kind == "flip":
            b[at] ^= 1 << (value % 8)
        elif kind == "insert":
            b.insert(at, value)
        elif kind == "delete":
            del b[at]
        else:  # a length field read at this position: zero or the largest value
            fill = b"\x00" if kind == "length0" else b"\xff"
            b[at : at + 4] = fill * 4
    return bytes(b)


def _fuzz(name: str, region: str, tried: list[bytes]) -> Callable[[], None]:
    s = sample(name)
    span = s.regions[region]

    @settings(
        max_examples=_ASKED,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.lists(_edit, min_size=1, max_size=4))
    def run(edits: list[tuple[str, float, int]]) -> None:
        mutated = _mutate(s.data, span, edits)
        tried.append(mutated)
        _decodes_or_image_error(mutated, f"{name} {region} {edits}")

    return run


def _cases() -> list[tuple[str, str]]:
    out = []
    for name in INPUTS:
        if name == "png":
            regions = ["signature", "IHDR", "chunks before IDAT", "IDAT header + zlib header"]
        elif name == "png16":  # written by Pillow: no ancillary chunks
            regions = ["signature", "IHDR", "IDAT header + zlib header"]
        elif name == "jpeg":
            regions = ["SOI + next segment", "DQT", "SOF0", "DHT", "SOS"]
        else:
            regions = [
                "DICM magic",
                "file meta group",
                "dataset header",
                "pixel data element header",
            ]
        out += [(name, r) for r in regions]
    return out


@pytest.mark.parametrize(("name", "region"), _cases())
def test_mutated_header_regions(name: str, region: str) -> None:
    tried: list[bytes] = []
    _fuzz(name, region, tried)()
    data = sample(name).data
    assert len({m for m in tried if m != data}) >= EXAMPLES, "too few distinct mutations"
