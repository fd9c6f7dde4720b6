"""``cxr ingest dicom``: the gateway loop of a PACS-fed EHR, in one command.

DICOM files (a directory is walked) are grouped by Study Instance UID; each study is STOWed to
the PACS, then registered in FHIR from what the PACS now holds for it (Patient, ServiceRequest
by accession number, Endpoint, ImagingStudy ``available`` with its series and instances:
:func:`~fhir_service.fhir.dicom_studies.dicom_study_bundle`). Running it again with the same
files changes nothing (the PACS overwrites identical instances, the ImagingStudy update is a
no-op); with more files of the same study it updates the one ImagingStudy. A file that is not
DICOM, or has no Study Instance UID, is reported and skipped; the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from fhir_service.dicom.web import DicomwebPacs
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.dicom_studies import dicom_study_bundle
from fhir_service.fhir.terminology import TERMINOLOGY

__all__ = ["DicomIngestReport", "StudyOutcome", "collect_files", "ingest_dicom"]

log = logging.getLogger(__name__)

#: Objects cxr-fhir itself wrote back (SR, Segmentation) are not part of the source study.
OWN_MANUFACTURER = "cxr-fhir"
DICOM_UID = TERMINOLOGY.identifier_system("dicom_uid")


@dataclass(frozen=True)
class StudyOutcome:
    study_uid: str
    files: int
    imaging_study: str
    """``ImagingStudy/{id}``"""
    outcome: str
    """created, updated or unchanged"""


@dataclass
class DicomIngestReport:
    studies: list[StudyOutcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, why)"""


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and every file under the directories named, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file()]
        else:
            found.append(path)
    return sorted(set(found))


def _read(files: Sequence[Path], max_bytes: int, report: DicomIngestReport) -> dict[str, list[Any]]:
    studies: dict[str, list[Any]] = {}
    for path in files:
        try:
            if path.stat().st_size > max_bytes:
                raise ValueError(f"larger than {max_bytes} bytes")
            ds = pydicom.dcmread(path)
            uid = str(ds.get("StudyInstanceUID", "") or "")
            if not uid or "SOPInstanceUID" not in ds:
                raise ValueError("no Study or SOP Instance UID")
        except (InvalidDicomError, ValueError, OSError) as exc:
            report.skipped.append((str(path), f"not a DICOM instance we can store: {exc}"))
            continue
        studies.setdefault(uid, []).append(ds)
    return studies


def _version(fhir: FhirClient, uid: str) -> str | None:
    """The current versionId of the ImagingStudy with this Study Instance UID, if any."""
    found = fhir.search(
        "ImagingStudy", {"identifier": f"{DICOM_UID}|urn:oid:{uid}", "_elements": "id"}
    )
    for entry in found.get("entry", []):
        return str(entry["resource"].get("meta", {}).get("versionId", ""))
    return None


def _outcome(response: dict[str, Any], before: str | None) -> tuple[str, str]:
    for entry in response.get("entry", []):
        location = str((entry.get("response") or {}).get("location") or "")
        if location.startswith("ImagingStudy/"):
            parts = location.split("/")
            after = parts[3] if len(parts) > 3 else ""
            if before is None:
                return "/".join(parts[:2]), "created"
            return "/".join(parts[:2]), "unchanged" if after == before else "updated"
    raise KeyError("the transaction response names no ImagingStudy")


def ingest_dicom(
    paths: Iterable[Path], fhir: FhirClient, pacs: DicomwebPacs, *, max_bytes: int
) -> DicomIngestReport:
    """STOW and register every study found in ``paths``."""
    report = DicomIngestReport()
    for uid, datasets in _read(collect_files(paths), max_bytes, report).items():
        pacs.store(datasets)
        held = [
            ds
            for ds in pacs.study_instances(uid)
            if str(ds.get("Manufacturer", "")) != OWN_MANUFACTURER
        ]
        before = _version(fhir, uid)
        response = fhir.transaction(dicom_study_bundle(held, pacs.base_url))
        study, outcome = _outcome(response, before)
        log.info("study %s: %s %s (%d files)", uid, study, outcome, len(datasets))
        report.studies.append(StudyOutcome(uid, len(datasets), study, outcome))
    return report
