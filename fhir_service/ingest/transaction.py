"""The one NIH → FHIR builder: Patient, ImagingStudy (with its boxes) and image Media, in
transactions of conditional creates.

Every entry is a conditional create on an identifier (Patient: NIH patient id; ImagingStudy:
image index; Media: image index), so a row that is already on the server is matched, not
created again. Identifier systems and extension URLs come from ``codes.json``.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fhir_service.fhir.datatypes import conditional_create, identifier_condition
from fhir_service.fhir.studies import age_at_study
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, finding_code
from fhir_service.ingest.nih import DICOM_UID_ROOT, BoundingBox, NihRecord
from fhir_service.ingest.rows import Row

__all__ = [
    "BoxIndex",
    "bbox_extension",
    "build_transaction",
    "created_id",
    "has_boxes",
    "imaging_study_resource",
    "study_boxes",
    "study_bundle",
    "with_boxes",
]

_T = TERMINOLOGY
PATIENT_ID_SYSTEM = _T.identifier_system("nih_patient_id")
IMAGE_INDEX_SYSTEM = _T.identifier_system("nih_image_index")
#: The Media that carries an NIH image's pixels (one per image index), for conditional creates.
IMAGE_MEDIA_SYSTEM = _T.identifier_system("nih_image_media")
EXT_VIEW_POSITION = _T.extension_url("view_position")
EXT_AGE_AT_STUDY = _T.extension_url("patient_age_at_study")
EXT_FOLLOW_UP = _T.extension_url("nih_follow_up")
#: One extension per box on the ImagingStudy (see README, "Bounding boxes").
EXT_BOUNDING_BOX = _T.extension_url("nih_bounding_box")
_BOX_PARTS = ("x", "y", "width", "height")
_NIH_LABELS = frozenset(_T.findings)


def patient_resource(rec: NihRecord) -> Resource:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_ID_SYSTEM, "value": rec.patient_id}],
        "gender": rec.sex,
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">NIH patient {rec.patient_id}</div>',
        },
    }


def imaging_study_resource(
    rec: NihRecord,
    patient_ref: str,
    *,
    status: str = "available",
    boxes: Sequence[BoundingBox] = (),
) -> Resource:
    """A DX chest study with one series and one instance, and the image's NIH boxes.

    ``status="registered"`` is for a study whose pixels are not on the server (the metadata
    alone was loaded): R4 defines it as "the existence of the imaging study is registered, but
    there is nothing yet available", and our Subscription only matches ``available``.
    """
    modality = _T.concept("modality_dx")
    return {
        "resourceType": "ImagingStudy",
        "extension": [
            {"url": EXT_AGE_AT_STUDY, "valueAge": age_at_study(rec.age_years)},
            {"url": EXT_VIEW_POSITION, "valueCode": rec.view_position},
            {"url": EXT_FOLLOW_UP, "valueInteger": rec.follow_up},
            *(bbox_extension(b) for b in boxes),
        ],
        "identifier": [
            {"system": IMAGE_INDEX_SYSTEM, "value": rec.image_index},
            {"system": _T.identifier_system("dicom_uid"), "value": f"urn:oid:{rec.study_uid}"},
        ],
        "status": status,
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
                "bodySite": _T.concept("body_site_thorax"),
                "instance": [
                    {
                        "uid": rec.instance_uid,
                        # Digital X-Ray Image Storage – For Presentation
                        "sopClass": _T.concept("sop_class_dx_presentation"),
                        "number": 1,
                        "title": rec.image_index,
                    }
                ],
            }
        ],
    }


def image_media_resource(
    rec: NihRecord,
    image: bytes,
    study_ref: str,
    patient_ref: str,
    *,
    content_type: str = "image/png",
) -> Resource:
    """The Media holding an NIH image inline, ``partOf`` its study, identified by image index."""
    return {
        "resourceType": "Media",
        "identifier": [{"system": IMAGE_MEDIA_SYSTEM, "value": rec.image_index}],
        "status": "completed",
        "partOf": [{"reference": study_ref}],
        "subject": {"reference": patient_ref},
        "content": {
            "contentType": content_type,
            "data": base64.b64encode(image).decode("ascii"),
            "size": len(image),
            "title": rec.image_index,
        },
    }


def created_id(response: Mapping[str, Any], resource_type: str) -> str:
    """The id of the first ``resource_type`` in a transaction-response Bundle."""
    for entry in response.get("entry", []):
        location = entry.get("response", {}).get("location", "")
        if location.startswith(f"{resource_type}/"):
            return str(location.split("/")[1])
    raise KeyError(f"no {resource_type} in the transaction response")


# --- bounding boxes on the study ------------------------------------------------------------


def bbox_extension(box: BoundingBox) -> Resource:
    """The ImagingStudy extension for one box: the finding coded exactly as our Observations
    code it (standard codings + the NIH label coding), x/y/width/height as decimals in pixels
    of the 1024² NIH PNG, origin at the top-left corner."""
    values = dict(zip(_BOX_PARTS, (box.x, box.y, box.width, box.height), strict=True))
    return {
        "url": EXT_BOUNDING_BOX,
        "extension": [
            {"url": "finding", "valueCodeableConcept": finding_code(box.finding)},
            *({"url": part, "valueDecimal": value} for part, value in values.items()),
        ],
    }


def _box_from_extension(ext: Mapping[str, Any], image_index: str) -> BoundingBox | None:
    parts = {e.get("url"): e for e in ext.get("extension", [])}
    codings = parts.get("finding", {}).get("valueCodeableConcept", {}).get("coding", [])
    label_system = _T.code_system_url("nih_label")
    finding = next((c.get("code") for c in codings if c.get("system") == label_system), None)
    values = [parts.get(p, {}).get("valueDecimal") for p in _BOX_PARTS]
    if (
        finding not in _NIH_LABELS
        or len(parts) != 1 + len(_BOX_PARTS)
        or not all(isinstance(v, int | float) for v in values)
    ):
        return None
    x, y, w, h = (float(v) for v in values)
    return BoundingBox(image_index, str(finding), x, y, w, h)


def study_boxes(study: Mapping[str, Any]) -> list[BoundingBox | None]:
    """Boxes on an ImagingStudy as our extension holds them; ``None`` for one that is not in
    that shape (edited by hand, an older format), so a comparison never matches it."""
    image_index = next(
        (
            i.get("value", "")
            for i in study.get("identifier", [])
            if i.get("system") == IMAGE_INDEX_SYSTEM
        ),
        "",
    )
    return [
        _box_from_extension(ext, image_index)
        for ext in study.get("extension", [])
        if ext.get("url") == EXT_BOUNDING_BOX
    ]


def has_boxes(study: Mapping[str, Any], boxes: Sequence[BoundingBox]) -> bool:
    """Whether the study carries exactly ``boxes`` (in any order) and no other box."""
    found = study_boxes(study)
    if any(b is None for b in found):
        return False
    return sorted(b.key for b in found if b is not None) == sorted(b.key for b in boxes)


def with_boxes(study: Mapping[str, Any], boxes: Sequence[BoundingBox]) -> Resource:
    """A copy of ``study`` whose box extensions are exactly ``boxes`` (others untouched)."""
    kept = [e for e in study.get("extension", []) if e.get("url") != EXT_BOUNDING_BOX]
    return {**study, "extension": [*kept, *(bbox_extension(b) for b in boxes)]}


# --- transactions -------------------------------------------------------------------------------


def _urn(kind: str, key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(DICOM_UID_ROOT, f'{kind}:{key}')}"


#: image index → its boxes, in file order
BoxIndex = dict[str, tuple[BoundingBox, ...]]


@dataclass(frozen=True)
class Planned:
    """Which request entries belong to which row, to read the response back."""

    row: Row
    study_entry: int
    media_entry: int | None


def build_transaction(
    rows: Sequence[Row],
    images: Mapping[str, bytes],
    boxes: BoxIndex | None = None,
    *,
    status: str | None = None,
) -> tuple[Resource, list[Planned]]:
    """One transaction for ``rows``: each Patient once, then each study (with its boxes, and
    its Media) in follow-up order — the ``Follow-up #`` column, not the filename suffix, which
    differs for 24,106 NIH rows — so HAPI's ids and ``_lastUpdated`` follow the clinical
    order.

    A study is ``available`` when its image is in ``images``, else ``registered``; ``status``
    overrides that (an integrator posting a study before its pixels, in tests and benches).
    """
    entries: list[Resource] = []
    patients: set[str] = set()
    planned: list[Planned] = []
    for row in sorted(rows, key=lambda r: (r.rec.patient_id, r.rec.follow_up)):
        rec = row.rec
        patient_urn = _urn("patient", rec.patient_id)
        if rec.patient_id not in patients:
            patients.add(rec.patient_id)
            condition = identifier_condition(PATIENT_ID_SYSTEM, rec.patient_id)
            entries.append(conditional_create(patient_urn, patient_resource(rec), condition))
        image = images.get(rec.image_index)
        study_urn = _urn("study", rec.image_index)
        study = imaging_study_resource(
            rec,
            patient_urn,
            status=status or ("available" if image is not None else "registered"),
            boxes=(boxes or {}).get(rec.image_index, ()),
        )
        condition = identifier_condition(IMAGE_INDEX_SYSTEM, rec.image_index)
        entries.append(conditional_create(study_urn, study, condition))
        study_entry = len(entries) - 1
        media_entry: int | None = None
        if image is not None:
            media = image_media_resource(rec, image, study_urn, patient_urn)
            condition = identifier_condition(IMAGE_MEDIA_SYSTEM, rec.image_index)
            entries.append(conditional_create(_urn("media", rec.image_index), media, condition))
            media_entry = len(entries) - 1
        planned.append(Planned(row, study_entry, media_entry))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, planned


def study_bundle(
    rec: NihRecord,
    image: bytes | None,
    *,
    tag: str | None = None,
    status: str | None = None,
) -> Resource:
    """One NIH study (its Patient, the study and its image Media) as a transaction.

    ``tag`` suffixes the image index and patient id, so tests and benchmarks can post the same
    NIH image many times as distinct studies; ``status`` as in :func:`build_transaction` (a
    study posted ``available`` without its image is how an integrator loses the race that
    shared/docs/FHIR_PROFILE.md describes).
    """
    if tag:
        rec = replace(
            rec, image_index=f"{rec.image_index}-{tag}", patient_id=f"{rec.patient_id}-{tag}"
        )
    images = {rec.image_index: image} if image is not None else {}
    bundle, _ = build_transaction([Row(0, rec)], images, status=status)
    return bundle
