"""``cxr ingest nih`` against the real HAPI: exact counts, re-runs, a killed run, concurrent
runs, bounding boxes, images with bulk inference.

Counts are read back with ``_summary=count`` and ``identifier=`` searches on our identifier
systems, so they are what the server holds, not what the loader believes it sent. The tests
run in file order on one HAPI: the 500-row slice, then rows 501-1000 (killed half-way and
resumed), then three concurrent runs of rows 4201-4400, then the sample images.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cxr_errors import InputError
from fhir_service.fhir import identifiers, terminology
from fhir_service.fhir.client import FhirClient
from fhir_service.ingest import (
    IngestOptions,
    Row,
    ingest,
    nih,
    read_rows,
    transaction,
)
from fhir_service.ingest.state import ProgressState
from fhir_service.ops.stack import settings_env, start_workers, worker_process
from fhir_service.settings import Settings
from subscriptions.pipeline import AnalyzedImage, Analyzer, Pipeline
from tests.integration.conftest import HapiServer
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

METADATA = nih.default_metadata_path()
BBOX = nih.default_bbox_path()
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
        _BEFORE["Patient"] = _count_all(fhir, "Patient", transaction.PATIENT_ID_SYSTEM)
        _BEFORE["ImagingStudy"] = _count_all(fhir, "ImagingStudy", transaction.IMAGE_INDEX_SYSTEM)


def _patients(fhir: FhirClient) -> int:
    return _count_all(fhir, "Patient", transaction.PATIENT_ID_SYSTEM) - _BEFORE["Patient"]


def _studies(fhir: FhirClient) -> int:
    return (
        _count_all(fhir, "ImagingStudy", transaction.IMAGE_INDEX_SYSTEM) - _BEFORE["ImagingStudy"]
    )


def _first_rows(n: int) -> list[Row]:
    return [r for r in read_rows(METADATA, limit=n) if isinstance(r, Row)]


def _boxes_of(images: set[str]) -> dict[str, list[nih.BoundingBox]]:
    """The shipped bbox file's boxes of these images, in file order."""
    out: dict[str, list[nih.BoundingBox]] = {}
    for box in nih.read_bboxes(BBOX):
        assert isinstance(box, nih.BoundingBox)
        if box.image_index in images:
            out.setdefault(box.image_index, []).append(box)
    return out


def _tally(
    fhir: FhirClient, resource_type: str, system: str, values: Sequence[str]
) -> Counter[str]:
    """How many resources carry each ``system|value`` identifier (searched 50 at a time)."""
    found: Counter[str] = Counter()
    for start in range(0, len(values), 50):
        chunk = values[start : start + 50]
        params = {"identifier": ",".join(f"{system}|{v}" for v in chunk), "_count": 100}
        total = fhir.count(resource_type, {"identifier": params["identifier"]})
        matched = list(fhir.search_all(resource_type, params))
        assert total == len(matched)
        for resource in matched:
            found.update(i["value"] for i in resource["identifier"] if i["system"] == system)
    return found


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


def test_a_rerun_with_the_bbox_file_adds_boxes_once(fhir: FhirClient, tmp_path: Path) -> None:
    """The slice was loaded without boxes. Re-runs with BBox_List_2017 give exactly the studies
    that have boxes their boxes, by both routes: rows sent again (matched in the transaction)
    and rows resumed from the progress file (not sent at all)."""
    boxed = _boxes_of({r.rec.image_index for r in _first_rows(SLICE)})
    assert len(boxed) == 2  # 00000032_037 (Infiltrate) and 00000072_000
    n = sum(len(b) for b in boxed.values())
    versions = {i: int(_study(fhir, i)["meta"]["versionId"]) for i in boxed}
    options = IngestOptions(
        metadata=METADATA, state_dir=tmp_path, limit=SLICE, batch_size=50, bbox=BBOX
    )

    sent = ingest(fhir, options)  # fresh state dir: every row sent, every study matched
    assert (sent.created, sent.rows_already_present) == ({}, SLICE)
    assert (sent.boxes_read, sent.boxes_written, sent.boxes_already_present) == (984, n, 0)
    assert sent.studies_boxes_updated == len(boxed)
    assert sent.boxes_skipped_by_reason == {"image not among the metadata rows read": 984 - n}
    for image_index, boxes in boxed.items():
        study = _study(fhir, image_index)
        assert transaction.study_boxes(study) == boxes  # exactly the file's numbers, read from HAPI
        assert int(study["meta"]["versionId"]) == versions[image_index] + 1
    infiltrate = _study(fhir, "00000032_037.png")["extension"][-1]["extension"][0]
    assert infiltrate["valueCodeableConcept"] == terminology.finding_code("Infiltration")

    # A study that lost its boxes (loaded by an older version) and rows resumed from the
    # progress file: the resumed rows' studies are checked, the one without boxes gets them.
    stripped_index = "00000072_000.png"
    stripped = _study(fhir, stripped_index)
    fhir.update(transaction.with_boxes(stripped, []))
    resumed = ingest(fhir, options)
    assert (resumed.rows_resumed, resumed.created, resumed.already_present) == (SLICE, {}, {})
    assert (resumed.boxes_written, resumed.boxes_already_present) == (
        len(boxed[stripped_index]),
        n - len(boxed[stripped_index]),
    )
    assert resumed.studies_boxes_updated == 1
    assert transaction.study_boxes(_study(fhir, stripped_index)) == boxed[stripped_index]

    # Nothing left to do: no study gets a new version.
    versions = {i: int(_study(fhir, i)["meta"]["versionId"]) for i in boxed}
    settled = ingest(fhir, options)
    assert (settled.boxes_written, settled.boxes_already_present) == (0, n)
    assert {i: int(_study(fhir, i)["meta"]["versionId"]) for i in boxed} == versions
    assert (_studies(fhir), _patients(fhir)) == (
        SLICE,
        len({r.rec.patient_id for r in _first_rows(SLICE)}),
    )


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
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"ingest ended early: {err}")
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
    result = json.loads(report.read_text())
    summary = result["rows"]
    assert summary["resumed"] >= SLICE // 3
    assert summary["resumed"] + summary["created"] + summary["already_present"] == SLICE
    assert summary["failed"] == summary["skipped"] == 0
    expected_patients = len({r.rec.patient_id for r in _first_rows(2 * SLICE)})
    assert (_patients(fhir), _studies(fhir)) == (expected_patients, 2 * SLICE)
    # The CLI loads the shipped bbox file by default: boxes of the killed run's studies were
    # created with them (found on the resumed rows), the rest written now; none twice.
    boxed = _boxes_of({cells[0] for cells in _raw_lines(start=SLICE, stop=2 * SLICE)})
    n = sum(len(b) for b in boxed.values())
    assert result["bbox"] == str(BBOX)
    boxes = result["boxes"]
    assert (boxes["read"], boxes["skipped"]) == (984, 984 - n)
    assert boxes["written"] + boxes["already_present"] == n
    for image_index, expected in boxed.items():
        assert transaction.study_boxes(_study(fhir, image_index)) == expected


def test_concurrent_runs_do_not_duplicate(
    fhir: FhirClient, test_settings: Settings, tmp_path: Path
) -> None:
    """Three ``cxr ingest nih`` processes load the same 200 rows at the same moment: two share
    the state dir (two runs on one host, the default), one has its own (another host). Every
    race for an identifier has one winner in HAPI; the losers' transactions are sent again
    and match. The server ends up with each NIH patient id and image index exactly once."""
    lines = _raw_lines(start=4200, stop=4400)
    part = _write_original_csv(tmp_path / "rows-4201-4400.csv", lines)
    rows = [r for r in read_rows(part) if isinstance(r, Row)]
    indexes = [r.rec.image_index for r in rows]
    patients = sorted({r.rec.patient_id for r in rows})
    boxed = _boxes_of(set(indexes))
    n_boxes = sum(len(b) for b in boxed.values())
    assert len(rows) == 200 and n_boxes == 2

    cxr = str(Path(sys.executable).with_name("cxr"))
    base_env = {**os.environ, **settings_env(test_settings)}
    shared, own = tmp_path / "state-shared", tmp_path / "state-own"
    runs: list[tuple[Path, subprocess.Popen[str]]] = []
    for i, state_dir in enumerate((shared, shared, own)):
        report = tmp_path / f"report-{i}.json"
        argv = [cxr, "ingest", "nih", "--metadata", str(part), "--report", str(report)]
        proc = subprocess.Popen(
            [*argv, "--batch-size", "10", "--concurrency", "2"],
            env={**base_env, "CXR_INGEST_STATE_DIR": str(state_dir)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs.append((report, proc))
    for _, proc in runs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
    reports = [json.loads(report.read_text()) for report, _ in runs]

    # The runs did overlap in time (otherwise this would test re-runs, not concurrency).
    spans = [
        (datetime.fromisoformat(r["started"]), timedelta(seconds=r["wall_s"])) for r in reports
    ]
    assert max(start for start, _ in spans) < min(start + wall for start, wall in spans)
    print("writes retried after a lost race:", [r["conflicts_retried"] for r in reports])

    for r in reports:
        rows_done = r["rows"]["created"] + r["rows"]["already_present"] + r["rows"]["resumed"]
        assert (rows_done, r["rows"]["failed"], r["rows"]["skipped"]) == (200, 0, 0)
        boxes = r["boxes"]
        assert boxes["written"] + boxes["already_present"] + boxes["skipped"] == 984
    # The run with its own state dir sent every row: created or matched, each exactly once.
    assert reports[2]["rows"]["resumed"] == 0
    # Each study, patient and box was created by exactly one of the three runs.
    assert sum(r["created"].get("ImagingStudy", 0) for r in reports) == 200
    assert sum(r["created"].get("Patient", 0) for r in reports) == len(patients)
    assert sum(r["boxes"]["written"] for r in reports) == n_boxes
    assert sum(r["boxes"]["studies_updated"] for r in reports) == 0

    # What the server holds: every identifier exactly once.
    studies = _tally(fhir, "ImagingStudy", transaction.IMAGE_INDEX_SYSTEM, indexes)
    assert studies == Counter({i: 1 for i in indexes})
    assert _tally(fhir, "Patient", transaction.PATIENT_ID_SYSTEM, patients) == Counter(
        {p: 1 for p in patients}
    )
    for image_index, expected in boxed.items():
        assert transaction.study_boxes(_study(fhir, image_index)) == expected
    # The shared progress file holds both runs' progress: every line, once, merged.
    (state_file,) = shared.glob("nih-*.json")
    state = ProgressState(state_file, {})
    state.load()
    assert state.done == [(2, 201)]


def _study(fhir: FhirClient, image_index: str) -> dict[str, Any]:
    found = list(
        fhir.search_all(
            "ImagingStudy", {"identifier": f"{transaction.IMAGE_INDEX_SYSTEM}|{image_index}"}
        )
    )
    assert len(found) == 1, f"{image_index}: {len(found)} studies"
    return found[0]


@pytest.fixture(scope="module")
def bulk(stack: Stack, test_settings: Settings) -> Iterator[Pipeline]:
    """The bulk-inference pipeline of ``cxr ingest --bulk-inference`` (models loaded once)."""
    from fhir_service.cli.ingest import bulk_pipeline

    with bulk_pipeline(test_settings) as pipeline:
        yield pipeline


class _Recording:
    """The pipeline's analyzer, noting the size of every batched pass."""

    def __init__(self, inner: Analyzer) -> None:
        self.inner = inner
        self.batches: list[int] = []

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    @property
    def last_timings(self) -> dict[str, float]:
        return self.inner.last_timings

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        self.batches.append(1)
        return self.inner.analyze(data, name)

    def analyze_many(self, images: Sequence[tuple[bytes, str]]) -> list[AnalyzedImage | InputError]:
        self.batches.append(len(images))
        return self.inner.analyze_many(images)


def test_sample_images_get_reports_boxes_and_the_rest_stay_untouched(
    stack: Stack, bulk: Pipeline, shared_dir: Path, tmp_path: Path
) -> None:
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
        bbox=BBOX,
        inference_batch_size=4,
    )
    # Bulk inference here while HAPI's rest-hook wakes the stack's worker for the same
    # studies: whichever comes second must find the report and write nothing.
    recording = _Recording(bulk.analyzer)
    bulk.analyzer = recording
    try:
        _load_and_check(stack, options, lines, with_images, bulk)
    finally:
        bulk.analyzer = recording.inner
    # batched passes, never more than --inference-batch-size images (the worker may have
    # reported some studies first: those are not analysed again)
    assert recording.batches and all(1 <= b <= 4 for b in recording.batches)
    assert sum(recording.batches) <= IMAGES_USED

    boxed = _boxes_of(set(names))
    assert len(boxed) == 12  # sample images with NIH boxes, with and without pixels here
    for image_index, expected in boxed.items():
        assert transaction.study_boxes(_study(stack.fhir, image_index)) == expected


def _load_and_check(
    stack: Stack,
    options: IngestOptions,
    lines: list[list[str]],
    with_images: list[str],
    bulk: Pipeline,
) -> None:
    t0 = time.monotonic()
    report = ingest(stack.fhir, options, process_studies=bulk.process_batch)
    assert report.failed == [] and report.skipped == []
    assert report.rows_with_images == IMAGES_USED
    assert sum(report.inference.values()) == IMAGES_USED
    outcomes = {"reported", "already reported", "already reported (concurrent writer)"}
    assert set(report.inference) <= outcomes, report.inference
    n_boxes = sum(len(b) for b in _boxes_of({cells[0] for cells in lines}).values())
    assert (report.boxes_written, report.boxes_already_present) == (n_boxes, 0)
    print(f"ingest + bulk inference of {IMAGES_USED} images: {time.monotonic() - t0:.1f} s")

    wait_for("the worker's queue to drain", stack.drained, timeout_s=300)
    for name in with_images:
        study = _study(stack.fhir, name)
        assert study["status"] == "available"
        assert len(stack.current_reports(str(study["id"]))) == 1, name
        assert len(stack.reports(str(study["id"]))) == 1, name
        assert stack.task(str(study["id"])) is None, name
    for cells in lines:
        if cells[0] in with_images:
            continue
        study = _study(stack.fhir, cells[0])
        assert study["status"] == "registered", cells[0]
        assert stack.reports(str(study["id"])) == [], cells[0]
        assert stack.task(str(study["id"])) is None, cells[0]

    # Again: every study is matched, every report and box found; nothing new anywhere.
    before = stack.fhir.count("DiagnosticReport")
    again = ingest(
        stack.fhir,
        IngestOptions(**{**options.__dict__, "resume": False}),
        process_studies=bulk.process_batch,
    )
    assert again.created == {}
    assert again.inference == {"already reported": IMAGES_USED}
    assert (again.boxes_written, again.boxes_already_present) == (0, n_boxes)
    assert stack.fhir.count("DiagnosticReport") == before


def _result_of(stack: Stack, study_id: str, image_sha256: str) -> dict[str, Any]:
    """A study's one report and its 14 Observations by NIH label, checked against the
    identifiers the builders derive from (study, model version, image sha256)."""
    (report,) = stack.reports(study_id)
    system, key = identifiers.report_identifier(study_id, stack.model_version, image_sha256)
    assert {"system": system, "value": key} in report["identifier"]
    label_system = terminology.TERMINOLOGY.code_system_url("nih_label")
    observation_system = terminology.TERMINOLOGY.identifier_system("observation")
    by_label: dict[str, Any] = {}
    for obs in stack.fhir.search_all("Observation", {"derived-from": f"ImagingStudy/{study_id}"}):
        label = next(c["code"] for c in obs["code"]["coding"] if c["system"] == label_system)
        slug = terminology.TERMINOLOGY.findings[label].slug
        assert obs["identifier"] == [{"system": observation_system, "value": f"{key}.{slug}"}]
        by_label[label] = {
            k: obs[k] for k in ("valueQuantity", "interpretation", "extension", "component", "code")
        }
    assert len(by_label) == 14
    return {"observations": by_label, "media": len(report.get("media", []))}


def test_bulk_inference_matches_the_subscription_path(stack: Stack, bulk: Pipeline) -> None:
    """The same NIH image through the rest-hook and the worker (one image per pass), and
    through bulk inference (a batched pass of four): the same number for every finding,
    identifiers derived the same way, and each path finds the other's report."""
    index = 3
    image = stack.settings.shared_dir / "data" / "nih-sample" / stack.records[index].image_index
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    by_worker = stack.post_study(index)
    wait_for("the worker's report", lambda: stack.reports(by_worker), timeout_s=300)
    wait_for("the worker's queue to drain", stack.drained, timeout_s=300)

    # The worker stops, so the studies posted now are the bulk path's alone; HAPI's rest-hook
    # still queues their jobs, which the restarted worker must find already reported.
    worker_process(stack.settings, 0).stop()
    try:
        by_bulk = stack.post_study(index)
        others = [stack.post_study(i) for i in (4, 5, 6)]
        recording = _Recording(bulk.analyzer)
        bulk.analyzer = recording
        try:
            outcomes = bulk.process_batch([(s, "") for s in (by_worker, by_bulk, *others)])
        finally:
            bulk.analyzer = recording.inner
    finally:
        start_workers(stack.settings, 1)
    assert outcomes == ["already reported", "reported", "reported", "reported", "reported"]
    assert recording.batches == [4]  # one batched pass over the four new images

    assert _result_of(stack, by_bulk, sha) == _result_of(stack, by_worker, sha)
    wait_for("the worker's queue to drain", stack.drained, timeout_s=300)
    for study_id in (by_worker, by_bulk, *others):
        assert len(stack.reports(study_id)) == len(stack.current_reports(study_id)) == 1
        assert stack.task(study_id) is None
