"""Preprocessing on every real sample image, and each bad input → its own specific error."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_errors import ImageError, ImageTooLargeError, NotARadiographError
from models.preprocess import Preprocess, PreprocessSpec, decode_image

PRE = Preprocess(PreprocessSpec())
SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _check(x: torch.Tensor) -> None:
    assert tuple(x.shape) == (1, 224, 224)
    assert x.dtype == torch.float32
    assert bool(torch.isfinite(x).all())
    assert float(x.min()) >= -1024.0 and float(x.max()) <= 1024.0
    assert float(x.max() - x.min()) > 500, "a radiograph spans most of the range"


def test_every_nih_sample_image(nih_dir: Path, nih_rows: list[dict[str, str]]) -> None:
    modes = set()
    for row in nih_rows:
        decoded = decode_image(nih_dir / row["file"])
        assert decoded.bit_depth == 8 and decoded.source_format == "png"
        _check(PRE(decoded))
        modes.add(row["png_mode"])
    assert {"L", "RGBA"} <= modes


def test_every_dicom(dicom_dir: Path) -> None:
    files = sorted(dicom_dir.glob("*.dcm"))
    assert len(files) >= 4
    for path in files:
        decoded = decode_image(path)
        assert decoded.source_format == "dicom"
        _check(PRE(decoded))


def test_monochrome1_equals_inverted_monochrome2_twin(dicom_dir: Path) -> None:
    mono1 = PRE(decode_image(dicom_dir / "txv_Fake_MONOHR1.dcm"))
    mono2 = PRE(decode_image(dicom_dir / SIIM))
    # on the ±1024 scale inversion is negation
    assert float((mono1 + mono2).abs().max()) < 1e-2


def test_jpeg2000_agrees_with_uncompressed_within_lossy_tolerance(dicom_dir: Path) -> None:
    raw = PRE(decode_image(dicom_dir / "RG1_UNCR.dcm"))
    j2k = PRE(decode_image(dicom_dir / "RG1_J2KI.dcm"))
    diff = (raw - j2k).abs()
    assert float(diff.mean()) < 2.0  # 0.1 % of the range
    assert float(diff.max()) < 40.0


def _with_sbit(png: bytes, bits: int) -> bytes:
    """``png`` with an sBIT chunk right after IHDR (8 signature + 25 IHDR bytes)."""
    body = bytes([bits])
    crc = zlib.crc32(b"sBIT" + body) & 0xFFFFFFFF
    chunk = struct.pack(">I", 1) + b"sBIT" + body + struct.pack(">I", crc)
    return png[:33] + chunk + png[33:]


def test_16bit_png_uses_its_sbit_depth(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 4095, 256 * 256).reshape(256, 256)).astype(np.uint16)
    path = tmp_path / "twelve_bit.png"
    Image.fromarray(ramp).save(path)
    path.write_bytes(_with_sbit(path.read_bytes(), 12))
    decoded = decode_image(path)
    assert decoded.bit_depth == 12
    x = PRE(decoded)
    _check(x)
    assert float(x.max()) > 1000  # 4095 is white, not squeezed into [-1017, -902]


def test_16bit_png_without_sbit_is_scaled_by_16_bits(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 4095, 256 * 256).reshape(256, 256)).astype(np.uint16)
    path = tmp_path / "no_sbit.png"
    Image.fromarray(ramp).save(path)
    decoded = decode_image(path, gate=False)
    assert decoded.bit_depth == 16
    assert float(decoded.pixels.max()) == pytest.approx(4095 / 65535)


def test_12bit_data_in_a_16bit_png_without_sbit_is_refused_with_the_likely_cause(
    tmp_path: Path,
) -> None:
    ramp = (np.linspace(0, 4095, 256 * 256).reshape(256, 256)).astype(np.uint16)
    path = tmp_path / "no_sbit.png"
    Image.fromarray(ramp).save(path)
    with pytest.raises(NotARadiographError, match="below 4096 and that has no sBIT chunk"):
        decode_image(path)
    path.write_bytes(_with_sbit(path.read_bytes(), 12))
    assert decode_image(path).bit_depth == 12


def test_non_square_is_center_cropped(tmp_path: Path) -> None:
    img = np.zeros((300, 600), np.uint8)
    img[:, 150:450] = 255  # the centre square is white, the sides black
    path = tmp_path / "wide.png"
    Image.fromarray(img).save(path)
    x = PRE(decode_image(path))
    assert float(x.min()) > 1000


# ---------------------------------------------------------------- bad inputs


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        decode_image(path)


def test_truncated_png(tmp_path: Path, nih_dir: Path, nih_rows: list[dict[str, str]]) -> None:
    data = (nih_dir / nih_rows[0]["file"]).read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(path)


def test_png_signature_with_a_garbage_first_chunk() -> None:
    # PIL.Image.open itself raises OSError("Truncated File Read") here, before any pixel is
    # read: it must still be the project's ImageError, or the job would never fail the study.
    with pytest.raises(ImageError, match=r"truncated or corrupt \(OSError: Truncated File Read"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"not really a png")


def test_text_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width×height but carries no pixels: a bomb costs nothing to make."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [20_000, 8_000])
def test_huge_image_refused_before_decoding(tmp_path: Path, side: int) -> None:
    # 20000² trips Pillow's own bomb guard; 8000² (64 MP) only our 50 MP limit
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageTooLargeError, match="pixel"):
        decode_image(path)


def test_too_many_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 2048)
    with pytest.raises(ImageTooLargeError, match="bytes exceeds"):
        decode_image(path, max_bytes=1024)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 512, 512
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageError, match="no pixel data"):
        decode_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        decode_image(tmp_path / "absent.png")
