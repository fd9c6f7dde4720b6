"""NIH ChestX-ray14 files: the metadata CSV (Data_Entry_2017 or the sample's manifest) and the
bounding-box list, read and validated. Nothing here talks to a server or builds FHIR; the
one NIH → FHIR builder is :mod:`fhir_service.ingest.transaction`.

NIH gives an age per image, not a birth date; the age recorded at each study is kept on the
ImagingStudy with the view position and the NIH follow-up number. Study and instance UIDs are
derived from the image index (``2.25.<uuid5>``), so the same image always gets the same UIDs.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cxr_errors import InputError
from models.types import NIH_FINDINGS

__all__ = [
    "BBOX_LABEL_ALIASES",
    "DATA_ENTRY_COLUMNS",
    "NIH_IMAGE_SIZE",
    "BadLine",
    "BoundingBox",
    "NihRecord",
    "default_bbox_path",
    "default_metadata_path",
    "dicom_uid",
    "header_columns",
    "open_text",
    "parse_record",
    "read_bboxes",
    "read_manifest",
]

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


#: NIH distributes every image as a 1024 × 1024 PNG; the boxes are in those pixels.
NIH_IMAGE_SIZE = 1024


#: BBox_List_2017 spells one label differently from Data_Entry_2017 and our codes.
BBOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}


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
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "coordinates must be finite numbers"
    if w <= 0 or h <= 0:
        return f"empty box: width {w:g}, height {h:g}"
    size = NIH_IMAGE_SIZE
    if x < 0 or y < 0 or x + w > size or y + h > size:
        return f"box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {size}×{size} image"
    return None
