"""``cxr ingest nih`` against the real HAPI: exact counts, re-runs, a killed run, images.

Counts are read back with ``_summary=count`` on our identifier systems, so they are what the
server holds, not what the loader believes it sent. The tests run in file order on one HAPI:
the 500-row slice, then rows 501-1000 (killed half-way and resumed), then the sample images.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fhir_service import nih
from fhir_service.fhir_client import FhirClient
from fhir_service.ingest import IngestOptions, ProgressState, Row, ingest, read_rows
from fhir_service.settings import Settings
from fhir_service.stack import settings_env
from tests.integration.conftest import HapiServer
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

METADATA = nih.default_metadata_path()
SLICE = 500
#: Sample images given to the image test. Each costs a model pass (twice at worst: bulk
#: inference and the rest-hook's worker may race); a dozen keeps the file's runtime modest.
IMAGES_USED = 12


@pytest.fixture
def fhir(hapi: HapiServer) -> Iterator[FhirClient]:
    with FhirClient(hapi.base_url, timeout=120) as client:
        yield client


#: NIH-identified resources other test modules of the session posted before this one (with
#: tagged identifiers); the counts below are this module's own.
_BEFORE: dict[str, int] = {}


def _count_all(fhir: FhirClient, resource_type: str, system: str) -> int:
    return fhir.count(resource_type, {"identifier": f"{system}|"})


@pytest.fixture(scope="module", autouse=True)
def _baseline(hapi: HapiServer) -> None:
    with FhirClient(hapi.base_url, timeout=120) as fhir:
        _BEFORE["Patient"] = _count_all(fhir, "Patient", nih.PATIENT_ID_SYSTEM)
        _BEFORE["ImagingStudy"] = _count_all(fhir, "ImagingStudy", nih.IMAGE_INDEX_SYSTEM)


def _patients(fhir: FhirClient) -> int:
    return _count_all(fhir, "Patient", nih.PATIENT_ID_SYSTEM) - _BEFORE["Patient"]


def _studies(fhir: FhirClient) -> int:
    return _count_all(fhir, "ImagingStudy", nih.IMAGE_INDEX_SYSTEM) - _BEFORE["ImagingStudy"]


def _first_rows(n: int) -> list[Row]:
    return [r for r in read_rows(METADATA, limit=n) if isinstance(r, Row)]


def _write_original_csv(path: Path, lines: list[list[str]]) -> Path:
    # The original, unquoted header: the loader must cope with it.
    header = ",".join(nih.DATA_ENTRY_COLUMNS)
    with path.open("w", newline="") as fh:
        fh.write(header + "\n")
        csv.writer(fh, lineterminator="\n").writerows(lines)
    return path


def _raw_lines(indexes: set[str] | None = None, start: int = 0, stop: int = 0) -> list[list[str]]:
    """Cells of Data_Entry rows: by image index, or data rows [start, stop)."""

    out: list[list[str]] = []
    with gzip.open(METADATA, "rt", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for i, cells in enumerate(reader):
            if indexes is not None:
                if cells[0] in indexes:
                    out.append(cells)
            elif start <= i < stop:
                out.append(cells)
            elif i >= stop:
                break
    return out


def test_slice_loads_exactly_and_a_second_run_adds_nothing(
    fhir: FhirClient, tmp_path: Path
) -> None:
    expected_patients = len({r.rec.patient_id for r in _first_rows(SLICE)})
    options = IngestOptions(
        metadata=METADATA, state_dir=tmp_path, limit=SLICE, batch_size=25, concurrency=2
    )
    first = ingest(fhir, options)
    assert (first.rows_created, first.rows_already_present, first.failed) == (SLICE, 0, [])
    assert first.created == {"ImagingStudy": SLICE, "Patient": expected_patients}
    assert first.skipped == []
    assert (_patients(fhir), _studies(fhir)) == (expected_patients, SLICE)

    # Same file, progress on disk: nothing is sent again.
    resumed = ingest(fhir, options)
    assert (resumed.rows_resumed, resumed.created, resumed.already_present) == (SLICE, {}, {})

    # Progress ignored: every row is sent and matched by its identifier, none created.
    again = ingest(fhir, IngestOptions(**{**options.__dict__, "resume": False}))
    assert again.created == {}
    assert again.already_present == {"ImagingStudy": SLICE, "Patient": expected_patients}
    assert (_patients(fhir), _studies(fhir)) == (expected_patients, SLICE)


def test_killed_run_resumes_to_the_same_counts(
    fhir: FhirClient, test_settings: Settings, tmp_path: Path
) -> None:
    # Rows 501-1000, as their own file in the original format.
    part = _write_original_csv(tmp_path / "part.csv", _raw_lines(start=SLICE, stop=2 * SLICE))
    state_dir = tmp_path / "state"
    env = {
        **os.environ,
        **settings_env(test_settings),
        "CXR_INGEST_STATE_DIR": str(state_dir),
    }
    argv = [sys.executable, "-m", "fhir_service.cli", "ingest", "nih", "--metadata", str(part)]
    proc = subprocess.Popen(
        [*argv, "--batch-size", "10", "--concurrency", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def half_done() -> bool:
            assert proc.poll() is None, f"ingest ended early: {proc.stderr and proc.stderr.read()}"
            for path in state_dir.glob("nih-*.json"):
                state = ProgressState(path, {})
                state.load()
                return sum(hi - lo + 1 for lo, hi in state.done) >= SLICE // 3
            return False

        wait_for("a third of the rows committed", half_done, timeout_s=180)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stderr:
            proc.stderr.close()
    interrupted = _studies(fhir)
    assert SLICE < interrupted < 2 * SLICE

    report = tmp_path / "report.json"
    done = subprocess.run(
        [*argv, "--report", str(report)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(report.read_text())["rows"]
    assert summary["resumed"] >= SLICE // 3
    assert summary["resumed"] + summary["created"] + summary["already_present"] == SLICE
    assert summary["failed"] == summary["skipped"] == 0
    expected_patients = len({r.rec.patient_id for r in _first_rows(2 * SLICE)})
    assert (_patients(fhir), _studies(fhir)) == (expected_patients, 2 * SLICE)


def _study(fhir: FhirClient, image_index: str) -> dict[str, object]:
    found = list(
        fhir.search_all("ImagingStudy", {"identifier": f"{nih.IMAGE_INDEX_SYSTEM}|{image_index}"})
    )
    assert len(found) == 1, f"{image_index}: {len(found)} studies"
    return found[0]


def test_sample_images_get_reports_and_the_rest_stay_untouched(
    stack: Stack, shared_dir: Path, tmp_path: Path, test_settings: Settings
) -> None:
    from fhir_service.cli.ingest import bulk_pipeline

    sample = shared_dir / "data" / "nih-sample"
    names = sorted(p.name for p in sample.glob("*.png"))
    with_images = names[:IMAGES_USED]
    images = tmp_path / "images" / "images_001" / "images"  # NIH's own folder layout
    images.mkdir(parents=True)
    for name in with_images:
        (images / name).symlink_to(sample / name)
    # All sample rows (some without their image here) + rows of patients with no image at all.
    lines = _raw_lines(set(names)) + _raw_lines(start=3000, stop=3010)
    assert len(lines) == len(names) + 10, "every sample image is in Data_Entry_2017_v2020"
    metadata = _write_original_csv(tmp_path / "sample.csv", lines)
    options = IngestOptions(
        metadata=metadata,
        state_dir=tmp_path / "state",
        images=tmp_path / "images",
        batch_size=8,
        concurrency=2,
    )
    # Bulk inference here while HAPI's rest-hook wakes the stack's worker for the same
    # studies: whichever comes second must find the report and write nothing.
    with bulk_pipeline(test_settings) as process:
        _load_and_check(stack, options, lines, with_images, process)


def _load_and_check(
    stack: Stack,
    options: IngestOptions,
    lines: list[list[str]],
    with_images: list[str],
    process: Callable[[str, str], str],
) -> None:
    t0 = time.monotonic()
    report = ingest(stack.fhir, options, process_study=process)
    assert report.failed == [] and report.skipped == []
    assert report.rows_with_images == IMAGES_USED
    assert sum(report.inference.values()) == IMAGES_USED
    print(f"ingest + bulk inference of {IMAGES_USED} images: {time.monotonic() - t0:.1f} s")

    wait_for("the worker's queue to drain", stack.drained, timeout_s=300)
    for name in with_images:
        study = _study(stack.fhir, name)
        assert study["status"] == "available"
        assert len(stack.reports(str(study["id"]))) == 1, name
        assert stack.task(str(study["id"])) is None, name
    for cells in lines:
        if cells[0] in with_images:
            continue
        study = _study(stack.fhir, cells[0])
        assert study["status"] == "registered", cells[0]
        assert stack.reports(str(study["id"])) == [], cells[0]
        assert stack.task(str(study["id"])) is None, cells[0]

    # Again: every study is matched, every report found; nothing new anywhere.
    before = stack.fhir.count("DiagnosticReport")
    again = ingest(
        stack.fhir,
        IngestOptions(**{**options.__dict__, "resume": False}),
        process_study=process,
    )
    assert again.created == {}
    assert again.inference == {"already reported": IMAGES_USED}
    assert stack.fhir.count("DiagnosticReport") == before
