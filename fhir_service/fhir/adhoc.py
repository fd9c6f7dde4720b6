"""``$analyze``'s answer: the result of one image that is not in the record, as a ``collection``
Bundle nobody posts.

The resources are those the pipeline writes (:func:`~fhir_service.fhir.results.
build_result_transaction`: Device and its model card, 14 Observations, heatmap Media, the
DiagnosticReport), made by the same builder so they read the same, with what only a stored
result has taken out: the Provenance (nothing was recorded), and every reference to a study
(there is none). Every resource, and the Bundle, carries the ``not-saved`` tag, and the
report's conclusion starts by saying so, so that no reader mistakes it for the record.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from fhir_service.fhir.datatypes import instant
from fhir_service.fhir.results import build_result_transaction
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology
from models.types import ImageAnalysis

__all__ = ["NOT_SAVED", "unsaved_analysis_bundle"]

NOT_SAVED = "NOT SAVED TO THE RECORD: ad-hoc analysis of an uploaded image."

#: Elements that point at the (absent) study, by resource type.
_STUDY_LINKS = {
    "Observation": ("derivedFrom",),
    "Media": ("partOf",),
    "DiagnosticReport": ("imagingStudy",),
}
#: Resource types whose ``subject`` is the patient (a model card's is its Device).
_ABOUT_THE_PATIENT = ("Observation", "Media", "DiagnosticReport")


def unsaved_analysis_bundle(
    analysis: ImageAnalysis,
    heatmaps: Mapping[str, bytes],
    *,
    image_sha256: str,
    recorded: datetime,
    patient: str | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """``patient`` (``Patient/{id}``) becomes the subject; without one there is none."""
    placeholder = {
        "resourceType": "ImagingStudy",
        "id": f"unsaved-{image_sha256[:16]}",
        "subject": {"reference": patient or "Patient/unsaved"},
    }
    tx = build_result_transaction(
        placeholder,
        analysis,
        heatmaps,
        image_sha256=image_sha256,
        recorded=recorded,
        terminology=terminology,
    )
    tag = terminology.concept("not_saved")
    entries: list[Resource] = []
    for entry in tx["entry"]:
        resource: dict[str, Any] = dict(entry["resource"])
        kind = resource["resourceType"]
        if kind == "Provenance":
            continue
        for name in _STUDY_LINKS.get(kind, ()):
            resource.pop(name, None)
        if patient is None and kind in _ABOUT_THE_PATIENT:
            resource.pop("subject", None)
        resource["meta"] = {**resource.get("meta", {}), "tag": [tag]}
        if kind == "DiagnosticReport":
            resource["conclusion"] = f"{NOT_SAVED} {resource['conclusion']}"
        entries.append({"fullUrl": entry["fullUrl"], "resource": resource})
    return {
        "resourceType": "Bundle",
        "meta": {"tag": [tag]},
        "type": "collection",
        "timestamp": instant(recorded),
        "entry": entries,
    }
