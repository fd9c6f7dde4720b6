"""Reading NIH metadata for ``cxr ingest``: the unquoted header, bad rows with line numbers,
batches cut between patients, transactions in follow-up order, the resumable state."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from cxr_errors import InputError
from fhir_service.fhir import studies
from fhir_service.ingest import (
    BadLine,
    Row,
    build_batches,
    build_transaction,
    nih,
    read_rows,
    transaction,
)
from fhir_service.ingest.state import ProgressState

# The original Data_Entry_2017_v2020.csv header, exactly: unquoted, so the bracketed names
# split into two cells each and every data row has 11 fields.
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def _csv(tmp_path: Path, *rows: str, name: str = "Data_Entry_2017_v2020.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


GOOD = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000003_000.png,Hernia,7,3,81,F,PA,2582,2991,0.143,0.143",
]


def test_unquoted_header_joins_bracketed_columns() -> None:
    columns = nih.header_columns(HEADER.split(","))
    assert [name for name, _ in columns] == list(nih.DATA_ENTRY_COLUMNS)
    assert dict(columns)["OriginalImage[Width,Height]"] == 2
    assert sum(span for _, span in columns) == 11


def test_original_header_rows_parse(tmp_path: Path) -> None:
    rows = list(read_rows(_csv(tmp_path, *GOOD)))
    assert all(isinstance(r, Row) for r in rows)
    assert [r.line for r in rows] == [2, 3, 4]
    first = rows[2]
    assert isinstance(first, Row)
    assert first.rec == nih.NihRecord("00000003_000.png", "3", 7, 81, "female", "PA", ("Hernia",))


def test_gzip_and_limit(tmp_path: Path) -> None:
    plain = _csv(tmp_path, *GOOD)
    packed = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert len(list(read_rows(packed, limit=2))) == 2


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("00000005_000.png,No Finding,0,5,40,X,PA,1,1,0.1,0.1", "unknown gender 'X'"),
        ("00000005_000.png,No Finding,0,5,130,F,PA,1,1,0.1,0.1", "age 130 out of range"),
        ("00000005_000.png,No Finding,0,5,-1,F,PA,1,1,0.1,0.1", "age -1 out of range"),
        ("00000005_000.png,No Finding,0,5,forty,F,PA,1,1,0.1,0.1", "age is not an integer"),
        ("00000005_000.png,No Finding,0,5,40,F,XX,1,1,0.1,0.1", "unknown view position"),
        ("00000005_000.png,No Finding,0,5", "missing column 'Patient Gender'"),
        ("00000005_000.png,No Finding,0,5,40,F,PA,1,1,0.1,0.1,9", "12 fields, the header has 11"),
        # the same image twice
        ("00000001_001.png,No Finding,2,1,58,M,PA,1,1,0.1,0.1", "duplicate image index"),
        # patient 1 is male on lines 2-3
        ("00000001_002.png,No Finding,2,1,58,F,PA,1,1,0.1,0.1", "gender female contradicts"),
        # follow-up 1 of patient 1 is line 3
        ("00000001_002.png,No Finding,1,1,58,M,PA,1,1,0.1,0.1", "follow-up #1 of patient 1"),
    ],
)
def test_bad_rows_are_reported_with_line_and_reason(tmp_path: Path, row: str, reason: str) -> None:
    after = "00000003_001.png,No Finding,8,3,81,F,PA,1,1,0.1,0.1"
    rows = list(read_rows(_csv(tmp_path, *GOOD, row, after)))
    bad = [r for r in rows if isinstance(r, BadLine)]
    assert len(bad) == 1, bad
    assert bad[0].line == 5
    assert reason in bad[0].reason
    # the rows around it are still read
    assert [r.line for r in rows if isinstance(r, Row)] == [2, 3, 4, 6]


def test_duplicate_names_first_line(tmp_path: Path) -> None:
    rows = list(read_rows(_csv(tmp_path, *GOOD, GOOD[0])))
    bad = rows[-1]
    assert isinstance(bad, BadLine)
    assert bad == BadLine(5, "00000001_000.png", "duplicate image index (first at line 2)")


def test_header_without_image_index_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="not an NIH header"):
        list(read_rows(path))


def test_sample_manifest_reads(shared_dir: Path) -> None:
    rows = list(read_rows(shared_dir / "data" / "nih-sample" / "manifest.csv"))
    assert rows and all(isinstance(r, Row) for r in rows)


def _rows(*spec: tuple[str, int]) -> list[Row]:
    """(patient id, follow-up) → rows with consecutive line numbers."""
    return [
        Row(
            line=i + 2,
            rec=nih.NihRecord(f"{int(p):08d}_{i:03d}.png", p, fu, 40, "male", "PA", ()),
        )
        for i, (p, fu) in enumerate(spec)
    ]


def test_batches_cut_between_patients() -> None:
    rows = _rows(("1", 0), ("1", 1), ("1", 2), ("2", 0), ("3", 0), ("3", 1))
    batches = list(build_batches(rows, 2))
    assert [[r.rec.patient_id for r in b] for b in batches] == [["1", "1", "1"], ["2", "3", "3"]]


def test_transaction_one_patient_and_follow_up_order() -> None:
    # Filename suffix order 0,1,2 but follow-up order 2,0,1: the follow-up column wins.
    rows = _rows(("7", 2), ("7", 0), ("7", 1))
    bundle, planned = build_transaction(rows, {rows[1].rec.image_index: b"\x89PNG"})
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Patient", "ImagingStudy", "Media", "ImagingStudy", "ImagingStudy"]
    follow_ups = [p.row.rec.follow_up for p in planned]
    assert follow_ups == [0, 1, 2]
    studies = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    # only the study whose pixels come along is available (the rest-hook matches that)
    assert [s["resource"]["status"] for s in studies] == ["available", "registered", "registered"]
    assert all(e["request"].get("ifNoneExist") for e in bundle["entry"])
    media = bundle["entry"][2]["resource"]
    assert media["partOf"] == [{"reference": studies[0]["fullUrl"]}]


def test_state_merges_and_survives_other_writers(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    a = ProgressState(path, {"sha256": "x"})
    b = ProgressState(path, {"sha256": "x"})
    a.add([2, 3, 4])
    b.add([10, 11])  # b never loaded a's progress; the save merges it in
    fresh = ProgressState(path, {})
    fresh.load()
    assert fresh.done == [(2, 4), (10, 11)]
    assert fresh.contains(3) and not fresh.contains(5)
    a.add([5, 6, 7, 8, 9])
    fresh.load()
    assert fresh.done == [(2, 11)]


@pytest.mark.parametrize("years", [0, 1, 95])
def test_age_at_study_round_trips_and_is_always_positive(years: int) -> None:
    # R4 age-1: an Age value must be positive; NIH records 14 infants as age 0.
    age = studies.age_at_study(years)
    assert age["value"] > 0 and age["code"] == "a" and age["system"] == studies.UCUM
    assert age.get("comparator") == ("<" if years == 0 else None)
    study = {"extension": [{"url": transaction.EXT_AGE_AT_STUDY, "valueAge": age}]}
    assert studies.study_age_and_view(study) == (years, None)
