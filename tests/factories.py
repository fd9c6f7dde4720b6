"""Builders for the FHIR resources tests post: one place, so every test posts the same shapes.

ImagingStudy instances are built from rows of the bundled NIH sample manifest
(``{shared_dir}/data/nih-sample/manifest.csv``), so the demographics and view positions
match the PNGs that later tests push through the model.
"""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NIH_PATIENT_SYSTEM = "urn:cxr-fhir:nih-cxr14:patient"
NIH_IMAGE_SYSTEM = "urn:cxr-fhir:nih-cxr14:image"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"

Resource = dict[str, Any]


@dataclass(frozen=True)
class ManifestRow:
    """One image of the NIH ChestX-ray14 sample (see /work/shared/docs/notes/nih-metadata.md)."""

    file: str
    finding_labels: tuple[str, ...]
    patient_id: str
    follow_up: int
    patient_age: int
    patient_sex: str
    view_position: str
    path: Path

    @property
    def image_id(self) -> str:
        return self.file.removesuffix(".png")


def nih_sample_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "nih-sample"


def manifest_rows(shared_dir: Path) -> list[ManifestRow]:
    folder = nih_sample_dir(shared_dir)
    with (folder / "manifest.csv").open(newline="") as fh:
        return [
            ManifestRow(
                file=r["file"],
                finding_labels=tuple(r["finding_labels"].split("|")),
                patient_id=r["patient_id"],
                follow_up=int(r["follow_up"]),
                patient_age=int(r["patient_age"]),
                patient_sex=r["patient_sex"],
                view_position=r["view_position"],
                path=folder / r["file"],
            )
            for r in csv.DictReader(fh)
        ]


def unique_suffix() -> str:
    """Keeps identifiers distinct between tests that share one server."""
    return uuid.uuid4().hex[:10]


def patient(row: ManifestRow | None = None, *, identifier: str | None = None) -> Resource:
    ident = identifier or (f"{row.patient_id}-{unique_suffix()}" if row else unique_suffix())
    res: Resource = {
        "resourceType": "Patient",
        "identifier": [{"system": NIH_PATIENT_SYSTEM, "value": ident}],
        "name": [{"family": "Sample", "given": [f"NIH-{row.patient_id if row else ident}"]}],
    }
    if row is not None:
        res["gender"] = {"M": "male", "F": "female"}.get(row.patient_sex, "unknown")
    return res


def imaging_study(
    row: ManifestRow,
    patient_ref: str,
    *,
    status: str = "available",
    identifier: str | None = None,
) -> Resource:
    """A single-series, single-instance DX chest study for one manifest row."""
    ident = identifier or f"{row.image_id}-{unique_suffix()}"
    # Deterministic-looking but unique DICOM UIDs under the UUID-derived 2.25 root.
    study_uid = f"2.25.{uuid.uuid4().int}"
    series_uid = f"2.25.{uuid.uuid4().int}"
    instance_uid = f"2.25.{uuid.uuid4().int}"
    return {
        "resourceType": "ImagingStudy",
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
            {"system": NIH_IMAGE_SYSTEM, "value": ident},
        ],
        "status": status,
        "subject": {"reference": patient_ref},
        "modality": [{"system": DICOM_DCM, "code": "DX"}],
        "description": f"Chest X-ray {row.view_position} ({row.file})",
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "series": [
            {
                "uid": series_uid,
                "number": 1,
                "modality": {"system": DICOM_DCM, "code": "DX"},
                "description": f"{row.view_position} chest",
                "numberOfInstances": 1,
                "bodySite": {
                    "system": "http://snomed.info/sct",
                    "code": "51185008",
                    "display": "Thoracic structure",
                },
                "instance": [
                    {
                        "uid": instance_uid,
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            # Digital X-Ray Image Storage - For Presentation
                            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1",
                        },
                        "number": 1,
                        "title": row.file,
                    }
                ],
            }
        ],
    }


def invalid_observation() -> Resource:
    """An Observation without the required ``status``: base R4 validation must refuse it."""
    return {
        "resourceType": "Observation",
        "code": {"coding": [{"system": "http://loinc.org", "code": "36554-4"}]},
    }


def binary(content_type: str, data_b64: str) -> Resource:
    return {"resourceType": "Binary", "contentType": content_type, "data": data_b64}
