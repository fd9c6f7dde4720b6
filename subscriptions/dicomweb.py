"""The DICOMweb pixel path: which PACS study an ImagingStudy names, and which instance of it
the model reads.

An ImagingStudy reaches its pixels over DICOMweb when it (or one of its series) references an
``Endpoint`` with connectionType ``dicom-wado-rs``, or when it carries a Study Instance UID
(identifier ``urn:dicom:uid``) and no Media while a PACS is configured. The Endpoint's address
must be the configured PACS (``CXR_DICOMWEB_URL``, or the embedded Orthanc): the worker holds
credentials for that one only, and fetching whatever address a resource names would be an
SSRF hole.

The frontal image is picked by the input gate's own DICOM rules
(:func:`models.gate.dicom_header_problem`) read from the instances' metadata: among the
instances that pass, PA before AP before an unstated view, then the largest matrix, then the
lowest series and instance number; when none passes and one is a lateral, the study fails as
"lateral view", otherwise with the first instance's reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cxr_errors import ImageError
from fhir_service.fhir.client import FhirClient
from models.gate import LATERAL_REASON, dicom_header_problem, refuse

__all__ = ["DicomInstance", "DicomSource", "pick_frontal", "study_uid", "wado_endpoint"]

WADO_RS = "dicom-wado-rs"
DICOM_UID_SYSTEM = "urn:dicom:uid"
_VIEW_RANK = {"PA": 0, "AP": 1}


class DicomSource(Protocol):
    """What the job needs from a PACS (:class:`fhir_service.dicom.web.DicomwebPacs`)."""

    @property
    def base_url(self) -> str: ...

    def study_instances(self, study_uid: str) -> list[Any]: ...

    def instance(
        self, study_uid: str, series_uid: str, sop_uid: str, *, max_bytes: int
    ) -> bytes: ...

    def store(self, datasets: Sequence[Any]) -> None: ...


@dataclass(frozen=True)
class DicomInstance:
    """The source instance of a report (it becomes Observation.derivedFrom's SOP UID)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


def study_uid(study: dict[str, Any]) -> str | None:
    """The Study Instance UID an ImagingStudy carries (``urn:dicom:uid`` / ``urn:oid:…``)."""
    for ident in study.get("identifier") or []:
        value = str(ident.get("value") or "")
        if ident.get("system") == DICOM_UID_SYSTEM and value:
            return value.removeprefix("urn:oid:")
    return None


def _endpoint_refs(study: dict[str, Any]) -> list[str]:
    refs = [str(e.get("reference") or "") for e in study.get("endpoint") or []]
    for series in study.get("series") or []:
        refs += [str(e.get("reference") or "") for e in series.get("endpoint") or []]
    return [r for r in refs if r]


def _is_wado_rs(endpoint: dict[str, Any]) -> bool:
    """R4's connectionType is one Coding (R5's a list of CodeableConcepts: accepted too)."""
    ctype = endpoint.get("connectionType") or {}
    items = ctype if isinstance(ctype, list) else [ctype]
    codings: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            codings += [item, *(item.get("coding") or [])]
    return any(isinstance(c, dict) and c.get("code") == WADO_RS for c in codings)


def wado_endpoint(fhir: FhirClient, study: dict[str, Any], pacs: DicomSource | None) -> bool:
    """Whether the study names a DICOMweb Endpoint; refuses one that is not our PACS."""
    refs = _endpoint_refs(study)
    if not refs:
        return False
    where = f"ImagingStudy/{study.get('id')}"
    endpoints = [fhir.read_reference(r) for r in refs]
    wado = [e for e in endpoints if _is_wado_rs(e)]
    if not wado:
        raise ImageError(f"{where} names an Endpoint, but none with connectionType {WADO_RS}")
    if pacs is None:
        raise ImageError(f"{where} names a DICOMweb Endpoint, but no PACS is configured")
    for endpoint in wado:
        address = str(endpoint.get("address") or "").rstrip("/")
        if address != pacs.base_url.rstrip("/"):
            raise ImageError(
                f"{where}: the DICOMweb Endpoint/{endpoint.get('id')} address {address!r} is "
                f"not the configured PACS ({pacs.base_url}; CXR_DICOMWEB_URL)"
            )
    return True


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def _int(ds: Any, keyword: str) -> int:
    try:
        return int(ds.get(keyword, 0) or 0)
    except (TypeError, ValueError):
        return 0


def _rank(ds: Any) -> tuple[int, int, int, int, str]:
    return (
        _VIEW_RANK.get(_text(ds, "ViewPosition"), 2),
        -_int(ds, "Rows") * _int(ds, "Columns"),
        _int(ds, "SeriesNumber"),
        _int(ds, "InstanceNumber"),
        str(ds.get("SOPInstanceUID", "")),
    )


def pick_frontal(instances: Sequence[Any], where: str) -> DicomInstance:
    """The instance the model reads (see the module docstring), or the gate's refusal."""
    images = [ds for ds in instances if "Rows" in ds]
    if not images:
        raise ImageError(f"{where}: the PACS study holds no image instance")
    problems = [(ds, dicom_header_problem(ds)) for ds in images]
    good = sorted((ds for ds, problem in problems if problem is None), key=_rank)
    if not good:
        reasons = [p for _, p in problems if p]
        lateral = [p for p in reasons if p.startswith(LATERAL_REASON)]
        raise refuse(where, lateral[0] if lateral else reasons[0])
    ds = good[0]
    return DicomInstance(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
    )
