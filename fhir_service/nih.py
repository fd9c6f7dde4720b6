"""NIH ChestX-ray14 metadata → FHIR Patient and ImagingStudy.

NIH gives an age per image, not a birth date, so the Patient carries no invented
birthDate: the age recorded at each study is kept on the ImagingStudy (extension
``patient-age-at-study``, a valueAge in years), with the view position and the NIH
follow-up number. Study and instance UIDs are derived from the image index
(``2.25.<uuid5>``), so the same image always gets the same UIDs.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cxr_errors import InputError
from models.types import NIH_FINDINGS

#: Our namespace for identifiers and extensions (not NIH's; NIH publishes no FHIR URIs).
CXR_NS = "https://cxr-fhir.example.org/fhir"
PATIENT_ID_SYSTEM = f"{CXR_NS}/sid/nih-patient-id"
IMAGE_INDEX_SYSTEM = f"{CXR_NS}/sid/nih-image-index"
#: The Media that carries an NIH image's pixels (one per image index), for conditional creates.
IMAGE_MEDIA_SYSTEM = f"{CXR_NS}/sid/nih-image-media"
EXT_AGE_AT_STUDY = f"{CXR_NS}/StructureDefinition/patient-age-at-study"
UCUM = "http://unitsofmeasure.org"
EXT_VIEW_POSITION = f"{CXR_NS}/StructureDefinition/view-position"
EXT_FOLLOW_UP = f"{CXR_NS}/StructureDefinition/nih-follow-up"
DICOM_UID_ROOT = uuid.UUID("6f1c3a52-8d0e-4a8e-9d55-2c1c7a0b9e11")
_GENDER = {"M": "male", "F": "female"}
_VIEWS = {"PA", "AP", "LL"}
_NIH_LABELS = frozenset(NIH_FINDINGS)


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
    rec: NihRecord,
    patient_ref: str,
    *,
    status: str = "available",
    boxes: Sequence[BoundingBox] = (),
) -> dict[str, Any]:
    """A DX chest study with one series and one instance, and the image's NIH boxes.

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
                "valueAge": age_at_study(rec.age_years),
            },
            {"url": EXT_VIEW_POSITION, "valueCode": rec.view_position},
            {"url": EXT_FOLLOW_UP, "valueInteger": rec.follow_up},
            *(bbox_extension(b) for b in boxes),
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


def age_at_study(years: int) -> dict[str, Any]:
    """NIH's age in completed years as a FHIR Age.

    R4's ``age-1`` invariant requires a positive value, so NIH's age 0 (14 rows) is written as
    "less than one year" (``comparator <``, value 1) rather than refused or rounded up.
    """
    age: dict[str, Any] = {"value": years, "unit": "years", "system": UCUM, "code": "a"}
    if years == 0:
        age.update(value=1, comparator="<")
    return age


def study_age_and_view(study: dict[str, Any]) -> tuple[int | None, str | None]:
    """Patient age at the study (years) and view position, from our ImagingStudy extensions."""
    age: int | None = None
    view: str | None = None
    for ext in study.get("extension", []):
        if ext.get("url") == EXT_AGE_AT_STUDY:
            value_age = ext.get("valueAge", {})
            value = value_age.get("value")
            if value is None:
                age = None
            elif value_age.get("comparator") == "<":
                age = max(math.ceil(value) - 1, 0)  # "< 1 a" is age 0 in completed years
            else:
                age = int(value)
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


# --- NIH bounding boxes (BBox_List_2017.csv) --------------------------------------------------

#: One extension per box on the ImagingStudy (see README, "Bounding boxes").
EXT_BOUNDING_BOX = f"{CXR_NS}/StructureDefinition/nih-bounding-box"
#: NIH distributes every image as a 1024 × 1024 PNG; the boxes are in those pixels.
NIH_IMAGE_SIZE = 1024
#: BBox_List_2017 spells one label differently from Data_Entry_2017 and our codes.
BBOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
_BOX_PARTS = ("x", "y", "width", "height")


@dataclass(frozen=True)
class BoundingBox:
    """One NIH box: a finding and a rectangle in the pixels of the 1024² NIH PNG."""

    image_index: str
    finding: str
    """our NIH label (``NIH_FINDINGS`` spelling: 'Infiltration', not the file's 'Infiltrate')"""
    x: float
    y: float
    width: float
    height: float
    line: int = field(default=0, compare=False)
    """line in the bbox file (header = 1); 0 when read back from FHIR"""

    @property
    def key(self) -> tuple[str, float, float, float, float]:
        return (self.finding, self.x, self.y, self.width, self.height)


@dataclass(frozen=True)
class BadLine:
    """A line of an NIH CSV that was not used (a row skipped, a box not attached), and why."""

    line: int
    image_index: str | None
    reason: str


def open_text(path: Path) -> TextIO:
    """A CSV file as text, plain or gzip-compressed (by its ``.gz`` suffix)."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def default_bbox_path() -> Path:
    """``BBox_List_2017.csv(.gz)`` next to Data_Entry in the installed torchxrayvision."""
    folder = default_metadata_path().parent
    for name in ("BBox_List_2017.csv.gz", "BBox_List_2017.csv"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"no BBox_List_2017.csv(.gz) in {folder}; pass --bbox PATH or --no-bbox")


def read_bboxes(path: Path) -> Iterator[BoundingBox | BadLine]:
    """Every box line of NIH's ``BBox_List_2017.csv`` (plain or .gz), with its line number.

    The header is unquoted (``Image Index,Finding Label,Bbox [x,y,w,h],,,``): the bracketed
    name splits into four cells and three empty names trail it. The original file ends every
    data row with the matching empty cells; torchxrayvision's copy drops them. Both read the
    same; a non-empty cell past ``h`` is a bad line, never ignored.
    """
    if not path.is_file():
        raise InputError(f"bounding-box file not found: {path}")
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path} is empty")
        names = [name for name, _span in header_columns(header)]
        if names[:3] != ["Image Index", "Finding Label", "Bbox [x,y,w,h]"]:
            raise InputError(
                f"{path}: line 1 is not NIH's bounding-box header "
                f"(Image Index, Finding Label, Bbox [x,y,w,h]): {header[:6]}"
            )
        first_at: dict[tuple[str, tuple[str, float, float, float, float]], int] = {}
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            item = _parse_box(reader.line_num, cells)
            if isinstance(item, BoundingBox):
                seen = first_at.setdefault((item.image_index, item.key), item.line)
                if seen != item.line:
                    item = BadLine(
                        item.line, item.image_index, f"duplicate box (first at line {seen})"
                    )
            yield item


def _parse_box(line: int, cells: list[str]) -> BoundingBox | BadLine:
    image_index = cells[0].strip() or None
    if image_index is None:
        return BadLine(line, None, "empty image index")
    if len(cells) < 6:
        return BadLine(line, image_index, f"{len(cells)} fields, a box needs 6")
    extra = [c for c in cells[6:] if c.strip()]
    if extra:
        return BadLine(line, image_index, f"unexpected values after h: {extra[:3]}")
    label = cells[1].strip()
    finding = BBOX_LABEL_ALIASES.get(label, label)
    if finding not in _NIH_LABELS:
        return BadLine(line, image_index, f"unknown finding {label!r}")
    try:
        x, y, w, h = (float(c) for c in cells[2:6])
    except ValueError as exc:
        return BadLine(line, image_index, f"bad number: {exc}")
    problem = _box_problem(x, y, w, h)
    if problem:
        return BadLine(line, image_index, problem)
    return BoundingBox(image_index, finding, x, y, w, h, line)


def _box_problem(x: float, y: float, w: float, h: float) -> str | None:
    import math

    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "coordinates must be finite numbers"
    if w <= 0 or h <= 0:
        return f"empty box: width {w:g}, height {h:g}"
    size = NIH_IMAGE_SIZE
    if x < 0 or y < 0 or x + w > size or y + h > size:
        return f"box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {size}×{size} image"
    return None


def bbox_extension(box: BoundingBox) -> dict[str, Any]:
    """The ImagingStudy extension for one box: the finding coded exactly as our Observations
    code it (standard codings + the NIH label coding), x/y/width/height as decimals in pixels
    of the 1024² NIH PNG, origin at the top-left corner."""
    from fhir_service.builders import finding_code

    values = dict(zip(_BOX_PARTS, (box.x, box.y, box.width, box.height), strict=True))
    return {
        "url": EXT_BOUNDING_BOX,
        "extension": [
            {"url": "finding", "valueCodeableConcept": finding_code(box.finding)},
            *({"url": part, "valueDecimal": value} for part, value in values.items()),
        ],
    }


def study_boxes(study: dict[str, Any]) -> list[BoundingBox | None]:
    """Boxes on an ImagingStudy as our extension holds them; ``None`` for one that is not in
    that shape (edited by hand, an older format), so a comparison never matches it."""
    from fhir_service.builders import TERMINOLOGY

    label_system = TERMINOLOGY.code_system_url("nih_label")
    image_index = next(
        (
            i.get("value", "")
            for i in study.get("identifier", [])
            if i.get("system") == IMAGE_INDEX_SYSTEM
        ),
        "",
    )
    out: list[BoundingBox | None] = []
    for ext in study.get("extension", []):
        if ext.get("url") != EXT_BOUNDING_BOX:
            continue
        parts = {e.get("url"): e for e in ext.get("extension", [])}
        codings = parts.get("finding", {}).get("valueCodeableConcept", {}).get("coding", [])
        finding = next((c.get("code") for c in codings if c.get("system") == label_system), None)
        values = [parts.get(p, {}).get("valueDecimal") for p in _BOX_PARTS]
        if (
            finding not in _NIH_LABELS
            or len(parts) != 1 + len(_BOX_PARTS)
            or not all(isinstance(v, int | float) for v in values)
        ):
            out.append(None)
            continue
        x, y, w, h = (float(v) for v in values)
        out.append(BoundingBox(image_index, str(finding), x, y, w, h))
    return out


def has_boxes(study: dict[str, Any], boxes: Sequence[BoundingBox]) -> bool:
    """Whether the study carries exactly ``boxes`` (in any order) and no other box."""
    found = study_boxes(study)
    if any(b is None for b in found):
        return False
    return sorted(b.key for b in found if b is not None) == sorted(b.key for b in boxes)


def with_boxes(study: dict[str, Any], boxes: Sequence[BoundingBox]) -> dict[str, Any]:
    """A copy of ``study`` whose box extensions are exactly ``boxes`` (others untouched)."""
    kept = [e for e in study.get("extension", []) if e.get("url") != EXT_BOUNDING_BOX]
    return {**study, "extension": [*kept, *(bbox_extension(b) for b in boxes)]}
