"""What cxr-fhir reads from an ImagingStudy, and the study extensions it writes.

:class:`StudyRef` is what the result builders need of a study; :func:`study_age_and_view`
reads the patient's age at the study and the view position from our extensions
(``codes.json``, ``extensions``), written by :func:`age_at_study` and the ingest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology

__all__ = ["StudyRef", "age_at_study", "study_age_and_view"]

UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class StudyRef:
    """What the builders need from an ImagingStudy resource."""

    id: str
    version_id: str | None
    subject: str
    started: str | None = None

    @classmethod
    def from_resource(cls, study: Mapping[str, Any]) -> StudyRef:
        if study.get("resourceType", "ImagingStudy") != "ImagingStudy":
            raise ValueError(f"expected an ImagingStudy, got {study.get('resourceType')}")
        sid = study.get("id")
        subject = (study.get("subject") or {}).get("reference")
        if not sid or not subject:
            raise ValueError("the ImagingStudy needs an id and a subject reference")
        version = (study.get("meta") or {}).get("versionId")
        return cls(
            id=str(sid),
            version_id=str(version) if version else None,
            subject=str(subject),
            started=study.get("started"),
        )

    @classmethod
    def lenient(cls, study: Mapping[str, Any]) -> StudyRef:
        """What can be read of a study that may be malformed (an empty subject when it has
        no usable one): enough to write its failed Task. Only the id is required."""
        sid = study.get("id")
        if not isinstance(sid, str | int) or not str(sid):
            raise ValueError("the ImagingStudy has no id")
        subject = (study.get("subject") or {}) if isinstance(study.get("subject"), dict) else {}
        reference = subject.get("reference")
        meta = study.get("meta") if isinstance(study.get("meta"), dict) else {}
        version = (meta or {}).get("versionId")
        return cls(
            id=str(sid),
            version_id=str(version) if version else None,
            subject=reference if isinstance(reference, str) else "",
        )

    @property
    def reference(self) -> str:
        return f"ImagingStudy/{self.id}"

    @property
    def versioned_reference(self) -> str:
        # Provenance records which version was read; everything else stays unversioned so
        # that ordinary searches (derived-from, imagingStudy, focus) match.
        if self.version_id is None:
            return self.reference
        return f"{self.reference}/_history/{self.version_id}"


def age_at_study(years: int) -> Resource:
    """An age in completed years as a FHIR Age.

    R4's ``age-1`` invariant requires a positive value, so an age of 0 (14 NIH rows) is written
    as "less than one year" (``comparator <``, value 1) rather than refused or rounded up.
    """
    age: Resource = {"value": years, "unit": "years", "system": UCUM, "code": "a"}
    if years == 0:
        age.update(value=1, comparator="<")
    return age


def study_age_and_view(
    study: Mapping[str, Any], *, terminology: Terminology = TERMINOLOGY
) -> tuple[int | None, str | None]:
    """Patient age at the study (years) and view position, from our ImagingStudy extensions."""
    age_url = terminology.extension_url("patient_age_at_study")
    view_url = terminology.extension_url("view_position")
    age: int | None = None
    view: str | None = None
    for ext in study.get("extension", []):
        if ext.get("url") == age_url:
            value_age = ext.get("valueAge", {})
            value = value_age.get("value")
            if value is None:
                age = None
            elif value_age.get("comparator") == "<":
                age = max(math.ceil(value) - 1, 0)  # "< 1 a" is age 0 in completed years
            else:
                age = int(value)
        elif ext.get("url") == view_url:
            view = ext.get("valueCode")
    return age, view
