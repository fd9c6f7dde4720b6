"""The input gate: every real sample passes, every synthetic non-radiograph is refused with its
reason, and the DICOM display rules (Presentation LUT Shape INVERSE, VOI LUT SIGMOID) hold."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_errors import ImageError, NotARadiographError
from models.gate import dicom_header_problem
from models.preprocess import decode_image

SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _refused(data: bytes | Path, match: str) -> str:
    with pytest.raises(NotARadiographError, match=match) as info:
        decode_image(data)
    message = info.value.message
    assert message.startswith("not a frontal chest radiograph: "), message
    return message


def test_all_nih_samples_pass(nih_dir: Path, nih_rows: list[dict[str, str]]) -> None:
    files = sorted(nih_dir.glob("*.png"))
    assert len(files) == len(nih_rows) == 56
    for path in files:
        decoded = decode_image(path)  # the gate is on by default; raises if refused
        assert decoded.height >= 256


def test_all_sample_dicom_files_pass(dicom_dir: Path) -> None:
    files = sorted(dicom_dir.glob("*.dcm"))
    assert len(files) == 4
    for path in files:
        assert decode_image(path).source_format == "dicom"


def test_black_white_and_grey_are_near_constant() -> None:
    for value in (0, 255, 128):
        _refused(_png(np.full((1024, 1024), value, np.uint8)), "near-constant")


def test_grey_noise_has_no_anatomy() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)
    _refused(_png(noise), "noise")


def test_colour_noise_and_a_colour_photograph_are_refused() -> None:
    rng = np.random.default_rng(1)
    _refused(_png(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)), "colour image")
    # a smooth colour gradient: passes every grey rule, fails on chroma alone
    y, x = np.mgrid[0:512, 0:512]
    photo = np.stack([x / 2, y / 2, 255 - x / 2], axis=2).astype(np.uint8)
    _refused(_png(photo), "colour image")


def test_grey_rgb_with_a_small_coloured_mark_passes(nih_dir: Path) -> None:
    grey = np.asarray(Image.open(nih_dir / "00000001_000.png").convert("L"))
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[100:200, 100:200] = (255, 0, 0)  # an annotation arrow: 1 % of the pixels
    decode_image(_png(rgb))


def test_tiny_and_extreme_aspect_images_are_refused(nih_dir: Path) -> None:
    _refused(_png(np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)), "too small")
    grey = np.asarray(Image.open(nih_dir / "00000001_000.png").convert("L"))
    _refused(_png(np.hstack([grey, grey, grey])), "aspect ratio")
    thumb = Image.fromarray(grey).resize((200, 200))
    _refused(_png(np.asarray(thumb)), "too small")


def _dicom(dicom_dir: Path, **changes: object) -> bytes:
    ds = pydicom.dcmread(dicom_dir / SIIM)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_lateral_dicom_is_refused_as_lateral(dicom_dir: Path) -> None:
    for view in ("LL", "RL", "LATERAL"):
        message = _refused(_dicom(dicom_dir, ViewPosition=view), "lateral view")
        assert "this model reads frontal views" in message and view in message


def test_ct_and_other_modalities_are_named(dicom_dir: Path) -> None:
    assert "Modality CT" in _refused(_dicom(dicom_dir, Modality="CT"), "Modality")
    assert "Modality MR" in _refused(_dicom(dicom_dir, Modality="MR"), "Modality")
    _refused(_dicom(dicom_dir, Modality=None), "Modality is missing")


def test_body_part_must_be_chest_when_present(dicom_dir: Path) -> None:
    _refused(_dicom(dicom_dir, BodyPartExamined="ABDOMEN"), "BodyPartExamined ABDOMEN")
    decode_image(_dicom(dicom_dir, BodyPartExamined=None))  # absent: passes
    decode_image(_dicom(dicom_dir, BodyPartExamined="CHEST ", ViewPosition="AP"))
    decode_image(_dicom(dicom_dir, ViewPosition=""))  # empty (Type 2): left to the pixels


def test_header_rules_alone_need_no_pixels(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / SIIM, stop_before_pixels=True)
    assert dicom_header_problem(ds) is None
    ds.ViewPosition = "LL"
    assert "lateral view" in (dicom_header_problem(ds) or "")


def test_gate_off_decodes_anything_decodable() -> None:
    decoded = decode_image(_png(np.zeros((8, 8), np.uint8)), gate=False)
    assert decoded.width == 8


def test_gate_errors_are_image_errors() -> None:
    assert issubclass(NotARadiographError, ImageError)


def test_presentation_lut_inverse_inverts_monochrome2(dicom_dir: Path) -> None:
    plain = decode_image(dicom_dir / SIIM).pixels
    inverse = decode_image(_dicom(dicom_dir, PresentationLUTShape="INVERSE")).pixels
    assert float(np.abs((1.0 - plain) - inverse).max()) < 1e-6
    # DX requires INVERSE together with MONOCHROME1: the same inversion, applied once
    mono1 = decode_image(dicom_dir / "txv_Fake_MONOHR1.dcm").pixels
    both = pydicom.dcmread(dicom_dir / "txv_Fake_MONOHR1.dcm")
    both.PresentationLUTShape = "INVERSE"
    buf = io.BytesIO()
    both.save_as(buf)
    assert float(np.abs(decode_image(buf.getvalue()).pixels - mono1).max()) < 1e-6


def test_voi_lut_sigmoid_is_not_linear(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "RG1_UNCR.dcm")
    center, width = 15000.0, 8000.0
    ds.WindowCenter, ds.WindowWidth = center, width
    stored = ds.pixel_array.astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    values = stored * slope + float(ds.get("RescaleIntercept", 0) or 0)
    results = {}
    for function in ("LINEAR", "SIGMOID"):
        ds.VOILUTFunction = function
        buf = io.BytesIO()
        ds.save_as(buf)
        results[function] = decode_image(buf.getvalue()).pixels
    expected = 1.0 - 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))  # MONOCHROME1
    assert float(np.abs(results["SIGMOID"] - expected).max()) < 1e-5
    assert float(np.abs(results["SIGMOID"] - results["LINEAR"]).max()) > 0.05


def test_16bit_png_brightness_follows_bit_depth_not_content() -> None:
    dark = np.full((512, 512), 1000, np.uint16)
    dark[:, 256:] = 4000
    bright = dark.copy()
    bright[0, 0] = 65535
    a = decode_image(_png(dark), gate=False).pixels
    b = decode_image(_png(bright), gate=False).pixels
    # the same stored value is equally bright whatever else the image holds
    assert a[10, 300] == pytest.approx(b[10, 300]) == pytest.approx(4000 / 65535)
