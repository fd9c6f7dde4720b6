"""Builders for what tests feed the code: one place, so every test uses the same shapes.

Synthetic inference results (plain numbers, no torch) for the FHIR builder tests, and the
FHIR resources tests post.

ImagingStudy instances are built from rows of the bundled NIH sample manifest
(``{shared_dir}/data/nih-sample/manifest.csv``), so the demographics and view positions
match the PNGs that later tests push through the model.
"""

from __future__ import annotations

import csv
import math
import struct
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fhir_service.fhir.results import build_result_transaction
from models.types import NIH_FINDINGS, FindingScore, ImageAnalysis

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


# --- synthetic inference results --------------------------------------------------------

#: Calibrated probabilities of the synthetic study; every other finding gets 0.05.
#: Pneumothorax 0.9 is what the profile's `value-quantity=gt0.8` query must find.
DEFAULT_PROBABILITIES: Mapping[str, float] = {
    "Pneumothorax": 0.9,
    "Effusion": 0.62,
    "Atelectasis": 0.31,
    "Cardiomegaly": 0.12,
}


THRESHOLD = 0.5


IMAGE_SHA256 = "ab" * 32


RECORDED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_analysis(
    probabilities: Mapping[str, float] | None = None,
    *,
    untrained: bool = False,
    model_version: str | None = None,
    threshold: float = THRESHOLD,
    calibrated: bool = True,
    band_kind: str = "calibration+tta",
) -> ImageAnalysis:
    """An ImageAnalysis with the given calibrated probabilities (others 0.05); with
    ``calibrated=False`` they are uncalibrated scores."""
    probs = dict(DEFAULT_PROBABILITIES if probabilities is None else probabilities)
    findings = []
    for name in NIH_FINDINGS:
        p = probs.get(name, 0.05)
        # A mildly miscalibrated raw score, so logit/sigmoid differ from the calibrated value.
        sigmoid = min(max(p * 0.8 + 0.05, 1e-4), 1 - 1e-4)
        logit = math.log(sigmoid / (1 - sigmoid))
        findings.append(
            FindingScore(
                finding=name,
                logit=logit,
                sigmoid_score=sigmoid,
                calibrated_probability=p,
                band_low=max(0.0, p - 0.08) if band_kind != "none" else p,
                band_high=min(1.0, p + 0.06) if band_kind != "none" else p,
                threshold=threshold,
                calibrated=calibrated,
                band_kind=band_kind,
            )
        )
    logits = np.array([f.logit for f in findings], dtype=np.float32)
    if model_version is None:
        model_version = "densenet121-res224-nih+sha256:0123abcd"
        if untrained:
            model_version += "+untrained"
    return ImageAnalysis(
        findings=tuple(findings),
        cams=np.zeros((len(NIH_FINDINGS), 7, 7), dtype=np.float32),
        cam_bias=logits,
        features=np.zeros(1024, dtype=np.float32),
        model_version=model_version,
        untrained=untrained,
    )


def make_png(width: int = 8, height: int = 8, shade: int = 128) -> bytes:
    """A valid greyscale PNG, built by hand so the tests need no image library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + bytes([shade]) * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make_xray_png(width: int = 512, height: int = 512) -> bytes:
    """A greyscale PNG that passes the input gate (models.gate): smooth, not flat, large."""
    y, x = np.mgrid[0:height, 0:width]
    body = 0.5 + 0.3 * np.sin(x / 40.0) * np.cos(y / 55.0)
    shades = np.clip(body * 255, 0, 255).astype(np.uint8)
    return make_gray_png(shades)


def make_gray_png(shades: np.ndarray) -> bytes:
    """A greyscale 8-bit PNG of ``shades`` ([H, W] uint8), built by hand like make_png."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width = shades.shape
    rows = b"".join(b"\x00" + shades[r].tobytes() for r in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make_heatmaps(analysis: ImageAnalysis) -> dict[str, bytes]:
    return {
        f.finding: make_png(shade=40 + i) for i, f in enumerate(analysis.findings) if f.positive
    }


def make_study(
    study_id: str = "cxr-1", version: str = "3", patient: str = "Patient/p1"
) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "meta": {"versionId": version},
        "status": "available",
        "subject": {"reference": patient},
        "started": "2024-12-31T22:15:00+00:00",
    }


def result_bundle(
    analysis: ImageAnalysis | None = None,
    *,
    study: Resource | None = None,
    recorded: datetime = RECORDED,
    image_sha256: str = IMAGE_SHA256,
    **kwargs: Any,
) -> Resource:
    analysis = analysis or make_analysis()
    return build_result_transaction(
        study or make_study(),
        analysis,
        make_heatmaps(analysis),
        image_sha256=image_sha256,
        recorded=recorded,
        **kwargs,
    )


def resources_of(bundle: Resource, kind: str) -> list[Resource]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def one_of(bundle: Resource, kind: str) -> Resource:
    (found,) = resources_of(bundle, kind)
    return found


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)
