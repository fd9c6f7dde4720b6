"""Reading an NIH metadata file into valid rows (and bad lines with their reasons), and
cutting the rows into transaction-sized batches."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cxr_errors import InputError
from fhir_service.ingest import nih
from fhir_service.ingest.nih import BadLine, NihRecord

__all__ = ["Row", "build_batches", "file_sha256", "read_rows"]


@dataclass(frozen=True)
class Row:
    """A valid metadata row and where it is in the file."""

    line: int
    rec: NihRecord


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_rows(path: Path, *, limit: int | None = None) -> Iterator[Row | BadLine]:
    """Every data row of ``path`` (Data_Entry_2017 or the sample manifest, plain or .gz).

    ``limit`` counts data rows read, bad ones included, so ``--limit 500`` always means the
    file's first 500 rows.
    """
    if not path.is_file():
        raise InputError(f"metadata file not found: {path}")
    with nih.open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path} is empty") from None
        columns = nih.header_columns(header)
        names = {name for name, _ in columns}
        if not names & {"Image Index", "file"}:
            raise InputError(
                f"{path}: line 1 is not an NIH header (no 'Image Index' column): {header[:4]}"
            )
        width = sum(span for _, span in columns)
        seen_image: dict[str, int] = {}
        patient_sex: dict[str, tuple[str, int]] = {}
        follow_ups: dict[tuple[str, int], int] = {}
        count = 0
        for cells in reader:
            if limit is not None and count >= limit:
                return
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            count += 1
            yield _check_row(line, cells, columns, width, seen_image, patient_sex, follow_ups)


def _check_row(
    line: int,
    cells: list[str],
    columns: list[tuple[str, int]],
    width: int,
    seen_image: dict[str, int],
    patient_sex: dict[str, tuple[str, int]],
    follow_ups: dict[tuple[str, int], int],
) -> Row | BadLine:
    row: dict[str, str] = {}
    i = 0
    for name, span in columns:
        if i + span > len(cells):
            break  # a short row: parse_record names the first missing column it needs
        row[name] = ",".join(cells[i : i + span])
        i += span
    image_index = (row.get("Image Index") or row.get("file") or "").strip() or None
    if len(cells) > width:
        return BadLine(line, image_index, f"{len(cells)} fields, the header has {width}")
    try:
        rec = nih.parse_record(row)
    except InputError as exc:
        return BadLine(line, image_index, exc.message)
    first = seen_image.get(rec.image_index)
    if first is not None:
        return BadLine(line, rec.image_index, f"duplicate image index (first at line {first})")
    seen_image[rec.image_index] = line
    sex, sex_line = patient_sex.setdefault(rec.patient_id, (rec.sex, line))
    if sex != rec.sex:
        return BadLine(
            line,
            rec.image_index,
            f"gender {rec.sex} contradicts {sex} for patient {rec.patient_id} (line {sex_line})",
        )
    fu_line = follow_ups.setdefault((rec.patient_id, rec.follow_up), line)
    if fu_line != line:
        return BadLine(
            line,
            rec.image_index,
            f"follow-up #{rec.follow_up} of patient {rec.patient_id} already at line {fu_line}",
        )
    return Row(line, rec)


def build_batches(rows: Iterable[Row], batch_size: int) -> Iterator[list[Row]]:
    """Consecutive rows in batches of about ``batch_size``, cut between patients.

    NIH rows are grouped by patient (the image index starts with the patient id), so a cut
    between patients puts each patient in one batch and concurrent batches never race to
    create the same Patient. A patient with more rows than 4 × ``batch_size`` is split
    anyway (the conditional create keeps that correct, only slower).
    """
    batch: list[Row] = []
    for row in rows:
        if batch and (
            len(batch) >= 4 * batch_size
            or (len(batch) >= batch_size and row.rec.patient_id != batch[-1].rec.patient_id)
        ):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch
