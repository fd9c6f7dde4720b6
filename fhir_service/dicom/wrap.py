"""Wrap a greyscale PNG/JPEG as a DICOM CR image (the demo's and tests' NIH studies).

What a modality would send for a chest radiograph: CR Image Storage, MONOCHROME2, the patient,
study, series and instance UIDs the caller chooses (so a second wrap of the same image is the
same instance), Modality CR, BodyPartExamined CHEST, ViewPosition as given (PA, AP, or LL to
make a lateral), an accession number, uncompressed or RLE Lossless.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import date

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ComputedRadiographyImageStorage, ExplicitVRLittleEndian, RLELossless

__all__ = ["WrapSpec", "wrap_image"]

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1453.1"


@dataclass(frozen=True)
class WrapSpec:
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    view_position: str = "PA"
    sex: str = ""
    age_years: int | None = None
    study_date: date = date(2020, 1, 1)
    rle: bool = False


def wrap_image(image: bytes, spec: WrapSpec) -> pydicom.Dataset:
    """A CR Image Storage dataset holding ``image`` (any greyscale PNG/JPEG Pillow reads)."""
    with Image.open(io.BytesIO(image)) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = UID(spec.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = spec.sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.PatientID = spec.patient_id
    ds.PatientName = spec.patient_name
    ds.PatientSex = spec.sex
    ds.PatientBirthDate = ""
    if spec.age_years is not None:
        ds.PatientAge = f"{min(spec.age_years, 999):03d}Y"
    ds.AccessionNumber = spec.accession
    ds.StudyID = spec.accession[:16]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = spec.view_position
    ds.StudyDescription = "XR CHEST"
    ds.SeriesDescription = f"CHEST {spec.view_position}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.Manufacturer = "cxr-fhir (wrapped image)"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    if spec.rle:
        ds.compress(RLELossless, pixels)
    return ds
