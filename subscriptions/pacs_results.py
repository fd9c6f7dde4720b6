"""Results back to the PACS: the TID 1500 SR and the heatmap Segmentation of a study read over
DICOMweb, STOWed before the FHIR transaction so that the DiagnosticReport only ever names
objects the PACS holds. Their UIDs derive from the report key: a job that runs twice stores
the same two instances again (Orthanc overwrites), never a second pair.
"""

from __future__ import annotations

import io
from typing import Any

import pydicom

from fhir_service.dicom.seg import HeatmapSegment, build_heatmap_segmentation
from fhir_service.dicom.sr import Algorithm, SrFinding, build_sr
from fhir_service.fhir.derived import DerivedObject, DerivedObjects
from fhir_service.fhir.terminology import TERMINOLOGY
from models.types import ImageAnalysis
from subscriptions.dicomweb import DicomSource

__all__ = ["store_dicom_results"]

_SNOMED = "http://snomed.info/sct"
ALGORITHM_NAME = "cxr-fhir chest X-ray triage"


def _code(label: str) -> tuple[str, str, str]:
    finding = TERMINOLOGY.findings[label]
    for coding in finding.codings:
        if coding.get("system") == _SNOMED:
            return coding["code"], "SCT", coding.get("display") or finding.text
    return label, "99CXRFHIR", finding.text


def _algorithm(analysis: ImageAnalysis) -> Algorithm:
    return Algorithm(
        name=ALGORITHM_NAME,
        version=analysis.model_version,
        weights_sha256=analysis.weights_sha256,
        untrained=analysis.untrained,
    )


def store_dicom_results(
    pacs: DicomSource, source_file: bytes, analysis: ImageAnalysis, key: str
) -> DerivedObjects:
    """Build the SR (and, if a finding is flagged, the Segmentation), STOW them, and say what
    was stored (for the DiagnosticReport)."""
    source = pydicom.dcmread(io.BytesIO(source_file))
    algorithm = _algorithm(analysis)
    findings = [
        SrFinding(
            f.finding,
            *_code(f.finding),
            score=f.calibrated_probability,
            threshold=f.threshold,
            flagged=f.positive,
            calibrated=f.calibrated,
        )
        for f in analysis.findings
    ]
    sr = build_sr(source, findings, algorithm, key=key)
    objects: list[Any] = [sr]
    flagged = [i for i, f in enumerate(analysis.findings) if f.positive]
    if flagged:
        segments = [
            HeatmapSegment(
                analysis.findings[i].finding, *_code(analysis.findings[i].finding), analysis.cams[i]
            )
            for i in flagged
        ]
        objects.append(build_heatmap_segmentation(source, segments, algorithm, key=key))
    pacs.store(objects)
    return DerivedObjects(
        study_uid=str(source.StudyInstanceUID),
        source_sop_uid=str(source.SOPInstanceUID),
        endpoint=pacs.base_url,
        objects=tuple(
            DerivedObject(
                series_uid=str(ds.SeriesInstanceUID),
                sop_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                modality=str(ds.Modality),
                description=str(ds.get("SeriesDescription", "")),
            )
            for ds in objects
        ),
    )
