"""What an AI Observation says besides its value: the image it was read from, and its score in
one structured extension.

The source image (design: ``FHIR_PROFILE.md``, "Results in the PACS") joins the FHIR and DICOM
sides. ``derivedFrom`` names the ImagingStudy always and, on the Media path, the Media whose
pixels were read; on the DICOMweb path the SOP Instance UID of the instance read (R4 has no
ImagingSelection to point at) is an extension holding an ``urn:dicom:uid`` identifier, the
same UID the DICOM SR references.

The score extension holds in one place what a program needs to weigh the number: the value,
what kind of number it is (``calibrated-probability`` or ``uncalibrated-score``), the
operating threshold and the decision, the band when one was computed with what kind of band
it is, and ``untrained`` when the model was.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhir_service.fhir.datatypes import quantity, ref, rounded
from fhir_service.fhir.terminology import Resource, Terminology
from models.types import FindingScore

__all__ = ["SourceImage", "score_extension", "source_derived_from", "source_extensions"]


@dataclass(frozen=True)
class SourceImage:
    """The image a result was read from (either, both or neither may be known)."""

    media: str | None = None
    """``Media/{id}`` whose pixels were read (the Media path)"""
    sop_instance_uid: str | None = None
    """the DICOM instance read (the DICOMweb path)"""
    media_version: str | None = None
    """the ``meta.versionId`` of that Media when it was read"""

    @property
    def versioned_media(self) -> str | None:
        """``Media/{id}/_history/{v}`` (what the Provenance records), or None."""
        if self.media is None or self.media_version is None:
            return None
        return f"{self.media}/_history/{self.media_version}"


def source_derived_from(source: SourceImage | None) -> list[Resource]:
    """``derivedFrom`` references beyond the ImagingStudy."""
    return [ref(source.media)] if source is not None and source.media else []


def source_extensions(source: SourceImage | None, t: Terminology) -> list[Resource]:
    if source is None or not source.sop_instance_uid:
        return []
    identifier = {
        "system": t.identifier_system("dicom_uid"),
        "value": f"urn:oid:{source.sop_instance_uid}",
    }
    return [{"url": t.extension_url("source_instance"), "valueIdentifier": identifier}]


def score_extension(f: FindingScore, *, untrained: bool, t: Terminology) -> Resource:
    kind = "calibrated-probability" if f.calibrated else "uncalibrated-score"
    parts: list[Resource] = [
        {"url": "score", "valueDecimal": rounded(f.calibrated_probability)},
        {"url": "scoreKind", "valueCode": kind},
        # Six places: torchxrayvision's operating points go down to 0.00044.
        {"url": "threshold", "valueDecimal": round(float(f.threshold), 6)},
        {"url": "atOrAboveThreshold", "valueBoolean": bool(f.positive)},
    ]
    if f.has_band:
        band = {"low": quantity(f.band_low, t), "high": quantity(f.band_high, t)}
        parts += [
            {"url": "band", "valueRange": band},
            {"url": "bandKind", "valueCode": f.band_kind},
        ]
    if untrained:
        # Only when true: trained output never contains the word.
        parts.append({"url": "untrained", "valueBoolean": True})
    return {"url": t.extension_url("ai_score"), "extension": parts}
