"""DICOM test objects: NIH sample PNGs wrapped as CR instances (fhir_service.dicom.wrap)."""

from __future__ import annotations

from pathlib import Path

import pydicom

from fhir_service.dicom.sr import stable_uid
from fhir_service.dicom.web import dataset_bytes
from fhir_service.dicom.wrap import WrapSpec, wrap_image
from tests.factories import unique_suffix


def nih_png(shared_dir: Path, index: int = 0) -> bytes:
    folder = shared_dir / "data" / "nih-sample"
    pngs = sorted(folder.glob("*.png"))
    return pngs[index].read_bytes()


def wrapped(
    png: bytes,
    *,
    tag: str | None = None,
    view: str = "PA",
    study: str | None = None,
    series: int = 1,
    rle: bool = False,
) -> pydicom.Dataset:
    """``png`` as a CR instance of a fresh (or the named) study."""
    tag = tag or unique_suffix()
    study_uid = study or stable_uid(f"test-study/{tag}")
    return wrap_image(
        png,
        WrapSpec(
            patient_id=f"TEST-{tag}",
            patient_name=f"Test^{tag}",
            study_uid=study_uid,
            series_uid=stable_uid(f"{study_uid}/series/{series}"),
            sop_uid=stable_uid(f"{study_uid}/series/{series}/{view}"),
            accession=f"A{tag}"[:16],
            view_position=view,
            sex="F",
            rle=rle,
        ),
    )


def part10(ds: pydicom.Dataset) -> bytes:
    return dataset_bytes(ds)
