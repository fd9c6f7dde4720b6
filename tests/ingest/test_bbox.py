"""NIH's BBox_List_2017: both file forms, bad lines with line numbers, the FHIR extension shape,
and which boxes a run can attach."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cxr_errors import InputError
from fhir_service.fhir.terminology import finding_code
from fhir_service.ingest import Row, build_transaction, load_boxes, nih, transaction
from fhir_service.ingest.nih import BadLine, BoundingBox

BBOX = nih.default_bbox_path()
# The original BBox_List_2017.csv header, exactly: unquoted, so "Bbox [x,y,w,h]" splits into
# four cells, and three empty column names trail it.
HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
# Its first two data lines, as NIH's own CSV writes them (with the trailing empty cells).
FIRST = (
    "00013118_008.png,Atelectasis,"
    "225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,"
)
INFILTRATE = (
    "00014716_007.png,Infiltrate,"
    "686.101694915254,131.543498411017,185.491525423729,313.491525423729,,,"
)


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path


def test_the_shipped_file_reads_completely() -> None:
    items = list(nih.read_bboxes(BBOX))
    boxes = [b for b in items if isinstance(b, BoundingBox)]
    assert len(boxes) == len(items) == 984
    assert len({b.image_index for b in boxes}) == 880
    # the file says "Infiltrate"; our code for it is Infiltration's
    labels = Counter(b.finding for b in boxes)
    assert labels["Infiltration"] == 123 and "Infiltrate" not in labels
    assert boxes[0] == BoundingBox(
        "00013118_008.png",
        "Atelectasis",
        225.084745762712,
        547.019216763771,
        86.7796610169491,
        79.1864406779661,
    )
    assert [b.line for b in boxes[:3]] == [2, 3, 4]


def test_original_csv_with_trailing_cells_reads_like_the_gz(tmp_path: Path) -> None:
    # Rewrite the shipped rows the way NIH's original file has them: 9 cells per line.
    with gzip.open(BBOX, "rt", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]
    original = _write(tmp_path, *(",".join([*r, "", "", ""]) for r in rows[1:]))
    from_gz = list(nih.read_bboxes(BBOX))
    from_csv = list(nih.read_bboxes(original))
    assert from_csv == from_gz
    assert [b.line for b in from_csv] == [b.line for b in from_gz]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("00000001_000.png,Tumour,1,1,10,10,,,", "unknown finding 'Tumour'"),
        ("00000001_000.png,Mass,a,1,10,10,,,", "bad number"),
        ("00000001_000.png,Mass,nan,1,10,10,,,", "finite"),
        ("00000001_000.png,Mass,1,1,10", "5 fields, a box needs 6"),
        ("00000001_000.png,Mass,1,1,10,10,,7,", "unexpected values after h: ['7']"),
        ("00000001_000.png,Mass,1,1,0,10,,,", "empty box"),
        ("00000001_000.png,Mass,-3,1,10,10,,,", "outside the 1024×1024 image"),
        ("00000001_000.png,Mass,1000,1,30,10,,,", "outside the 1024×1024 image"),
        (",Mass,1,1,10,10,,,", "empty image index"),
        (FIRST, "duplicate box (first at line 2)"),
    ],
)
def test_bad_lines_are_reported_with_line_and_reason(
    tmp_path: Path, line: str, reason: str
) -> None:
    items = list(nih.read_bboxes(_write(tmp_path, FIRST, line, INFILTRATE)))
    bad = [b for b in items if isinstance(b, BadLine)]
    assert len(bad) == 1, bad
    assert bad[0].line == 3
    assert reason in bad[0].reason
    # the lines around it are still read
    assert [b.line for b in items if isinstance(b, BoundingBox)] == [2, 4]


def test_other_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text("Image Index,Finding Labels,Follow-up #\n")
    with pytest.raises(InputError, match="not NIH's bounding-box header"):
        list(nih.read_bboxes(path))


def test_extension_codes_the_finding_like_the_observations() -> None:
    box = BoundingBox("00014716_007.png", "Infiltration", 686.1, 131.5, 185.4, 313.4)
    ext = transaction.bbox_extension(box)
    assert ext["url"] == transaction.EXT_BOUNDING_BOX
    assert set(ext) == {"url", "extension"}  # complex: sub-extensions, no value (ext-1)
    parts = {e["url"]: e for e in ext["extension"]}
    assert list(parts) == ["finding", "x", "y", "width", "height"]
    assert parts["finding"]["valueCodeableConcept"] == finding_code("Infiltration")
    codes = {c["code"] for c in parts["finding"]["valueCodeableConcept"]["coding"]}
    assert codes == {"112121", "Infiltration"}  # DICOM "Infiltrate" + our NIH label
    assert [parts[p]["valueDecimal"] for p in ("x", "y", "width", "height")] == [
        686.1,
        131.5,
        185.4,
        313.4,
    ]


def _study_with(*boxes: BoundingBox) -> dict[str, Any]:
    rec = nih.NihRecord("00014716_007.png", "14716", 7, 50, "male", "PA", ())
    return transaction.imaging_study_resource(rec, "Patient/1", boxes=boxes)


def test_boxes_read_back_compare_and_replace() -> None:
    a = BoundingBox("00014716_007.png", "Mass", 1.5, 2.0, 30.0, 40.0)
    b = BoundingBox("00014716_007.png", "Nodule", 100.0, 200.0, 10.0, 12.25)
    study = _study_with(a, b)
    assert transaction.study_boxes(study) == [a, b]
    assert transaction.has_boxes(study, [b, a])  # order does not matter
    assert not transaction.has_boxes(study, [a])  # an extra box on the server is a difference
    assert not transaction.has_boxes(_study_with(a), [a, b])
    moved = BoundingBox("00014716_007.png", "Mass", 1.5, 2.0, 30.0, 41.0)
    assert not transaction.has_boxes(study, [moved, b])
    # A box extension not in our shape never counts as equal: it gets replaced.
    broken = {**study, "extension": [*study["extension"], {"url": transaction.EXT_BOUNDING_BOX}]}
    assert not transaction.has_boxes(broken, [a, b])
    fixed = transaction.with_boxes(broken, [b])
    assert transaction.study_boxes(fixed) == [b]
    # the study's other extensions (age, view, follow-up) stay as they were
    others = [e for e in fixed["extension"] if e["url"] != transaction.EXT_BOUNDING_BOX]
    assert others == [e for e in study["extension"] if e["url"] != transaction.EXT_BOUNDING_BOX]


def test_transaction_puts_boxes_on_their_study() -> None:
    rows = [
        Row(2, nih.NihRecord("00000001_000.png", "1", 0, 40, "male", "PA", ())),
        Row(3, nih.NihRecord("00000001_001.png", "1", 1, 41, "male", "PA", ())),
    ]
    box = BoundingBox("00000001_001.png", "Effusion", 10.0, 20.0, 30.0, 40.0)
    bundle, _ = build_transaction(rows, {}, {"00000001_001.png": (box,)})
    studies = {
        e["resource"]["identifier"][0]["value"]: e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "ImagingStudy"
    }
    assert transaction.study_boxes(studies["00000001_001.png"]) == [box]
    assert transaction.study_boxes(studies["00000001_000.png"]) == []


def test_boxes_a_run_cannot_attach_are_listed_with_the_reason(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "00000001_000.png,Mass,1,1,10,10,,,",  # line 2: its row is loaded
        "00000002_000.png,Mass,1,1,10,10,,,",  # line 3: its row was skipped
        "00000009_000.png,Mass,1,1,10,10,,,",  # line 4: no such row
        "00000001_000.png,Tumour,1,1,10,10,,,",  # line 5: unknown finding
    )
    valid = [Row(2, nih.NihRecord("00000001_000.png", "1", 0, 40, "male", "PA", ()))]
    skipped = [BadLine(3, "00000002_000.png", "age 130 out of range 0..120")]
    boxes, read, bad = load_boxes(path, valid, skipped, limit=None)
    assert read == 4
    assert [b.line for b in boxes["00000001_000.png"]] == [2]
    assert [(b.line, b.reason) for b in bad] == [
        (3, "its metadata row was skipped (line 3: age 130 out of range 0..120)"),
        (4, "image index not in the metadata"),
        (5, "unknown finding 'Tumour'"),
    ]
    # With --limit the missing row may lie beyond the rows read: said so, not "missing".
    _, _, limited = load_boxes(path, valid, skipped, limit=1)
    assert limited[1].reason == "image not among the metadata rows read (--limit 1)"
