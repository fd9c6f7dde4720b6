"""NIH ChestX-ray14 metadata → FHIR Patient and ImagingStudy.

NIH gives an age per image, not a birth date, so the Patient carries no invented
birthDate: the age recorded at each study is kept on the ImagingStudy (extension
``patient-age-at-study``, a valueAge in years), with the view position and the NIH
follow-up number. Study and instance UIDs are derived from the image index
(``2.25.<uuid5>``), so the same image always gets the same UIDs.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_errors import InputError

#: Our namespace for identifiers and extensions (not NIH's; NIH publishes no FHIR URIs).
CXR_NS = "https://cxr-fhir.dev/fhir"
PATIENT_ID_SYSTEM = f"{CXR_NS}/sid/nih-patient-id"
IMAGE_INDEX_SYSTEM = f"{CXR_NS}/sid/nih-image-index"
EXT_AGE_AT_STUDY = f"{CXR_NS}/StructureDefinition/patient-age-at-study"
EXT_VIEW_POSITION = f"{CXR_NS}/StructureDefinition/view-position"
EXT_FOLLOW_UP = f"{CXR_NS}/StructureDefinition/nih-follow-up"
DICOM_UID_ROOT = uuid.UUID("6f1c3a52-8d0e-4a8e-9d55-2c1c7a0b9e11")
_GENDER = {"M": "male", "F": "female"}
_VIEWS = {"PA", "AP", "LL"}


@dataclass(frozen=True)
class NihRecord:
    """One NIH image row, validated."""

    image_index: str
    patient_id: str
    follow_up: int
    age_years: int
    sex: str
    """'male' or 'female'"""
    view_position: str
    finding_labels: tuple[str, ...]
    """NIH labels; empty for 'No Finding'"""

    @property
    def study_uid(self) -> str:
        return dicom_uid(f"study:{self.image_index}")

    @property
    def series_uid(self) -> str:
        return dicom_uid(f"series:{self.image_index}")

    @property
    def instance_uid(self) -> str:
        return dicom_uid(f"instance:{self.image_index}")


def dicom_uid(key: str) -> str:
    """A DICOM UID under the UUID-derived root 2.25 (PS3.5 B.2), stable for ``key``."""
    return f"2.25.{uuid.uuid5(DICOM_UID_ROOT, key).int}"


def parse_record(row: dict[str, str]) -> NihRecord:
    """Validate one row (manifest.csv or Data_Entry_2017 column names); InputError says why."""

    def col(*names: str) -> str:
        for name in names:
            if name in row and row[name] is not None:
                return row[name].strip()
        raise InputError(f"missing column {names[0]!r}")

    image_index = col("file", "Image Index")
    if not image_index:
        raise InputError("empty image index")
    sex = col("patient_sex", "Patient Gender")
    if sex not in _GENDER:
        raise InputError(f"unknown gender {sex!r} (expected M or F)")
    try:
        age = int(col("patient_age", "Patient Age"))
    except ValueError as exc:
        raise InputError(f"age is not an integer: {exc}") from exc
    if not 0 <= age <= 120:
        raise InputError(f"age {age} out of range 0..120")
    view = col("view_position", "View Position")
    if view not in _VIEWS:
        raise InputError(f"unknown view position {view!r}")
    try:
        follow_up = int(col("follow_up", "Follow-up #"))
        patient_id = str(int(col("patient_id", "Patient ID")))
    except ValueError as exc:
        raise InputError(f"bad number: {exc}") from exc
    labels = col("finding_labels", "Finding Labels")
    findings = tuple(x for x in labels.split("|") if x and x != "No Finding")
    return NihRecord(image_index, patient_id, follow_up, age, _GENDER[sex], view, findings)


def read_manifest(path: Path) -> Iterator[NihRecord]:
    """Rows of the shared sample's manifest.csv (all valid by construction)."""
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            yield parse_record(row)


def patient_resource(rec: NihRecord) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_ID_SYSTEM, "value": rec.patient_id}],
        "gender": rec.sex,
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">NIH patient {rec.patient_id}</div>',
        },
    }


def patient_conditional(rec: NihRecord) -> str:
    return f"identifier={PATIENT_ID_SYSTEM}|{rec.patient_id}"


def study_conditional(rec: NihRecord) -> str:
    return f"identifier={IMAGE_INDEX_SYSTEM}|{rec.image_index}"


def imaging_study_resource(rec: NihRecord, patient_ref: str) -> dict[str, Any]:
    """An available DX chest study with one series and one instance."""
    modality = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}
    return {
        "resourceType": "ImagingStudy",
        "extension": [
            {
                "url": EXT_AGE_AT_STUDY,
                "valueAge": {
                    "value": rec.age_years,
                    "unit": "years",
                    "system": "http://unitsofmeasure.org",
                    "code": "a",
                },
            },
            {"url": EXT_VIEW_POSITION, "valueCode": rec.view_position},
            {"url": EXT_FOLLOW_UP, "valueInteger": rec.follow_up},
        ],
        "identifier": [
            {"system": IMAGE_INDEX_SYSTEM, "value": rec.image_index},
            {"system": "urn:dicom:uid", "value": f"urn:oid:{rec.study_uid}"},
        ],
        "status": "available",
        "modality": [modality],
        "subject": {"reference": patient_ref},
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "description": f"XR chest {rec.view_position} (NIH {rec.image_index})",
        "series": [
            {
                "uid": rec.series_uid,
                "number": 1,
                "modality": modality,
                "description": f"{rec.view_position} view",
                "numberOfInstances": 1,
                "bodySite": {
                    "system": "http://snomed.info/sct",
                    "code": "51185008",
                    "display": "Thoracic structure",
                },
                "instance": [
                    {
                        "uid": rec.instance_uid,
                        # Digital X-Ray Image Storage – For Presentation
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1",
                        },
                        "number": 1,
                        "title": rec.image_index,
                    }
                ],
            }
        ],
    }
