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
CXR_NS = "https://cxr-fhir.example.org/fhir"
PATIENT_ID_SYSTEM = f"{CXR_NS}/sid/nih-patient-id"
IMAGE_INDEX_SYSTEM = f"{CXR_NS}/sid/nih-image-index"
#: The Media that carries an NIH image's pixels (one per image index), for conditional creates.
IMAGE_MEDIA_SYSTEM = f"{CXR_NS}/sid/nih-image-media"
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
        # Name the column as the file spells it: NIH's Data_Entry or our manifest.
        spelled = names[-1] if any(" " in k or "#" in k for k in row) else names[0]
        raise InputError(f"missing column {spelled!r}")

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


def imaging_study_resource(
    rec: NihRecord, patient_ref: str, *, status: str = "available"
) -> dict[str, Any]:
    """A DX chest study with one series and one instance.

    ``status="registered"`` is for a study whose pixels are not on the server (the metadata
    alone was loaded): R4 defines it as "the existence of the imaging study is registered, but
    there is nothing yet available", and our Subscription only matches ``available``.
    """
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


def study_transaction(
    rec: NihRecord,
    image: bytes | None,
    *,
    content_type: str = "image/png",
    tag: str | None = None,
) -> dict[str, Any]:
    """One transaction: the Patient (conditional), the ImagingStudy and the Media with its pixels.

    The study and its pixels must arrive together: HAPI notifies us once the study is
    committed, and a study whose Media is posted later would be processed without pixels.
    ``tag`` suffixes the identifiers, so tests can post the same NIH image many times.
    """
    import base64

    suffix = f"-{tag}" if tag else ""
    rec_t = NihRecord(
        rec.image_index + suffix,
        rec.patient_id + suffix,
        rec.follow_up,
        rec.age_years,
        rec.sex,
        rec.view_position,
        rec.finding_labels,
    )
    patient_urn = f"urn:uuid:{uuid.uuid5(DICOM_UID_ROOT, 'patient:' + rec_t.patient_id)}"
    study_urn = f"urn:uuid:{uuid.uuid5(DICOM_UID_ROOT, 'study:' + rec_t.image_index)}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient_urn,
            "resource": patient_resource(rec_t),
            "request": {
                "method": "POST",
                "url": "Patient",
                "ifNoneExist": patient_conditional(rec_t),
            },
        },
        {
            "fullUrl": study_urn,
            "resource": imaging_study_resource(rec_t, patient_urn),
            "request": {
                "method": "POST",
                "url": "ImagingStudy",
                "ifNoneExist": study_conditional(rec_t),
            },
        },
    ]
    if image is not None:
        media = {
            "resourceType": "Media",
            "status": "completed",
            "partOf": [{"reference": study_urn}],
            "subject": {"reference": patient_urn},
            "content": {
                "contentType": content_type,
                "data": base64.b64encode(image).decode("ascii"),
                "size": len(image),
                "title": rec_t.image_index,
            },
        }
        media_urn = f"urn:uuid:{uuid.uuid5(DICOM_UID_ROOT, 'media:' + rec_t.image_index)}"
        entries.append(
            {
                "fullUrl": media_urn,
                "resource": media,
                "request": {"method": "POST", "url": "Media"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def created_id(response: dict[str, Any], resource_type: str) -> str:
    """The id of the first ``resource_type`` in a transaction-response Bundle."""
    for entry in response.get("entry", []):
        location = entry.get("response", {}).get("location", "")
        if location.startswith(f"{resource_type}/"):
            return str(location.split("/")[1])
    raise KeyError(f"no {resource_type} in the transaction response")


def study_age_and_view(study: dict[str, Any]) -> tuple[int | None, str | None]:
    """Patient age at the study (years) and view position, from our ImagingStudy extensions."""
    age: int | None = None
    view: str | None = None
    for ext in study.get("extension", []):
        if ext.get("url") == EXT_AGE_AT_STUDY:
            value = ext.get("valueAge", {}).get("value")
            age = int(value) if value is not None else None
        elif ext.get("url") == EXT_VIEW_POSITION:
            view = ext.get("valueCode")
    return age, view


# --- the full NIH metadata file (Data_Entry_2017*.csv) ------------------------------------

#: Data_Entry_2017 column names as they are meant (the header itself is not quoted, so the
#: two bracketed names each split into two cells; see :func:`header_columns`).
DATA_ENTRY_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width,Height]",
    "OriginalImagePixelSpacing[x,y]",
)


def header_columns(cells: list[str]) -> list[tuple[str, int]]:
    """Column names with how many CSV cells each spans.

    NIH's header is unquoted, so ``OriginalImage[Width,Height]`` arrives as the two cells
    ``OriginalImage[Width`` and ``Height]`` while each data row holds two numbers there. Cells
    from an unclosed ``[`` up to the matching ``]`` are joined back into one name that spans
    as many cells as it was split into. Quoted headers (one cell each) pass through unchanged.
    """
    columns: list[tuple[str, int]] = []
    i = 0
    while i < len(cells):
        name = cells[i].strip()
        span = 1
        if "[" in name and "]" not in name:
            j = i + 1
            while j < len(cells) and "]" not in cells[j]:
                j += 1
            if j < len(cells):
                name = ",".join(c.strip() for c in cells[i : j + 1])
                span = j - i + 1
                i = j
        columns.append((name, span))
        i += 1
    return columns


def default_metadata_path() -> Path:
    """``Data_Entry_2017_v2020.csv(.gz)`` inside the installed torchxrayvision package."""
    from importlib.util import find_spec

    # find_spec, not import: importing torchxrayvision loads torch (seconds) and silences
    # warnings process-wide; we only need where its data folder is.
    spec = find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("torchxrayvision is not installed; pass --metadata PATH")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    for name in ("Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017_v2020.csv"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"no Data_Entry_2017_v2020.csv(.gz) in {folder}; pass --metadata PATH")


def image_media_resource(
    rec: NihRecord,
    image: bytes,
    study_ref: str,
    patient_ref: str,
    *,
    content_type: str = "image/png",
) -> dict[str, Any]:
    """The Media holding an NIH image inline, ``partOf`` its study, identified by image index."""
    import base64

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


def media_conditional(rec: NihRecord) -> str:
    return f"identifier={IMAGE_MEDIA_SYSTEM}|{rec.image_index}"
