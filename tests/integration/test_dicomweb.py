"""PACS → FHIR → inference → PACS with the real Orthanc (Debian, DICOMweb plugin), HAPI,
PostgreSQL and worker: a study STOWed and registered by `cxr ingest dicom` gets its FHIR report
and its SR + heatmap Segmentation in Orthanc (read back over WADO-RS and parsed by highdicom);
a lateral-only study and a CT end in failed Tasks; ingest is idempotent by Study Instance UID;
the real compressed files in shared/data/dicom are read over WADO-RS and reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from fhir_service.dicom.web import DicomwebPacs
from fhir_service.fhir.dicom_studies import dicom_study_bundle
from fhir_service.fhir.tasks import awaited_in_pacs, task_business_status
from fhir_service.ingest.dicom_files import ingest_dicom
from tests.dicom.helpers import nih_png, wrapped
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration


def _ingest(stack: Stack, pacs: DicomwebPacs, tmp_path: Path, *datasets: pydicom.Dataset) -> Any:
    for i, ds in enumerate(datasets):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
    return ingest_dicom([tmp_path], stack.fhir, pacs, max_bytes=stack.settings.max_image_bytes)


def _study_id(report: Any) -> str:
    assert len(report.studies) == 1, report
    return str(report.studies[0].imaging_study.split("/")[1])


def test_a_stowed_study_gets_its_report_and_its_sr_and_heatmaps_in_the_pacs(
    stack: Stack, pacs: DicomwebPacs, shared_dir: Path, tmp_path: Path
) -> None:
    source = wrapped(nih_png(shared_dir, 1))
    result = _ingest(stack, pacs, tmp_path, source)
    assert result.studies[0].outcome == "created"
    study_id = _study_id(result)
    study = stack.fhir.read("ImagingStudy", study_id)
    assert study["endpoint"] and study["basedOn"]
    assert study["series"][0]["bodySite"]["code"]
    reports = wait_for("a report over DICOMweb", lambda: stack.reports(study_id))
    assert len(reports) == 1
    report = reports[0]
    refs = [r["reference"] for r in report["imagingStudy"]]
    assert refs[0] == f"ImagingStudy/{study_id}"
    derived = stack.fhir.read_reference(refs[1])
    instances = {i["uid"]: s["modality"]["code"] for s in derived["series"] for i in s["instance"]}
    assert "SR" in instances.values()
    stored = {
        str(ds.SOPInstanceUID): ds for ds in pacs.study_instances(str(source.StudyInstanceUID))
    }
    assert set(instances) <= set(stored)
    for sop, modality in instances.items():
        ds = stored[sop]
        obj = pacs._client.retrieve_instance(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop
        )
        if modality == "SR":
            sr = hd.sr.Comprehensive3DSR.from_dataset(obj)
            groups = sr.content.get_image_measurement_groups()
            assert len(groups) == 14
            assert groups[0].source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
            texts = " ".join(str(e.value) for e in obj.iterall() if e.keyword == "TextValue")
            assert "UNTRAINED - not for clinical use" in texts
        else:
            seg = hd.seg.Segmentation.from_dataset(obj)
            assert seg.SegmentationType == "FRACTIONAL"
    flagged = [c for c in report.get("conclusionCode", [])]
    assert ("SEG" in instances.values()) == bool(flagged)
    # Ingest again: same study, nothing changes, no second report.
    again = _ingest(stack, pacs, tmp_path, source)
    assert again.studies[0].outcome == "unchanged"
    assert _study_id(again) == study_id
    assert len(stack.reports(study_id)) == len(stack.current_reports(study_id)) == 1


def _failed_task(stack: Stack, study_id: str) -> dict[str, Any]:
    def failed() -> dict[str, Any] | None:
        task = stack.task(study_id)
        return task if task and task["status"] == "failed" else None

    return dict(wait_for("a failed Task", failed))


def test_a_lateral_only_study_ends_in_a_failed_task(
    stack: Stack, pacs: DicomwebPacs, shared_dir: Path, tmp_path: Path
) -> None:
    lateral = wrapped(nih_png(shared_dir, 2), view="LL")
    study_id = _study_id(_ingest(stack, pacs, tmp_path, lateral))
    task = _failed_task(stack, study_id)
    assert "lateral view" in task["statusReason"]["text"]
    assert task_business_status(task) == "undecodable-image"
    assert stack.reports(study_id) == []


def test_a_frontal_and_a_lateral_report_on_the_frontal(
    stack: Stack, pacs: DicomwebPacs, shared_dir: Path, tmp_path: Path
) -> None:
    png = nih_png(shared_dir, 3)
    tag = "fl-" + tmp_path.name[-8:]
    frontal = wrapped(png, view="AP", tag=tag)
    lateral = wrapped(png, view="LL", tag=tag, study=str(frontal.StudyInstanceUID), series=2)
    study_id = _study_id(_ingest(stack, pacs, tmp_path, lateral, frontal))
    assert stack.fhir.read("ImagingStudy", study_id)["numberOfSeries"] == 2
    reports = wait_for("a report", lambda: stack.reports(study_id))
    derived = stack.fhir.read_reference(reports[0]["imagingStudy"][1]["reference"])
    assert str(frontal.SOPInstanceUID) in derived["description"]


#: JPEG 2000 (MONOCHROME1, 15-bit) and JPEG baseline: two compressed transfer syntaxes, two
#: studies (RG1_UNCR is RG1_J2KI uncompressed with the same SOP Instance UID, and the
#: txv file the SIIM one as MONOCHROME1, also with the same UIDs).
REAL_FILES = ["RG1_J2KI.dcm", "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_dicom_files_are_read_over_wado_rs(
    stack: Stack, pacs: DicomwebPacs, shared_dir: Path, name: str
) -> None:
    path = shared_dir / "data" / "dicom" / name
    result = ingest_dicom([path], stack.fhir, pacs, max_bytes=stack.settings.max_image_bytes)
    study_id = _study_id(result)
    reports = wait_for(f"a report for {name}", lambda: stack.reports(study_id))
    assert len(reports) == 1
    derived = stack.fhir.read_reference(reports[0]["imagingStudy"][1]["reference"])
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert str(source.SOPInstanceUID) in derived["description"]


def test_a_study_registered_before_its_stow_waits_on_the_pacs_then_reports(
    stack: Stack, pacs: DicomwebPacs, shared_dir: Path
) -> None:
    """The EHR registers the study (with its Endpoint) before the modality's STOW reaches the
    PACS: the study waits with the Study Instance UID on its Task; the STOW alone (nothing
    changes in FHIR) then leads to the one report."""
    source = wrapped(nih_png(shared_dir, 3), tag=unique_suffix())
    response = stack.fhir.transaction(dicom_study_bundle([source], pacs.base_url))
    study_id = next(
        str(e["response"]["location"]).split("/")[1]
        for e in response["entry"]
        if str(e["response"]["location"]).startswith("ImagingStudy/")
    )

    def waiting() -> dict[str, Any] | None:
        task = stack.task(study_id)
        return task if task is not None and task["status"] == "on-hold" else None

    task = wait_for("the study waiting for its image in the PACS", waiting)
    assert awaited_in_pacs(task)
    assert str(source.StudyInstanceUID) in task["statusReason"]["text"]
    pacs.store([source])
    reports = wait_for("a report once the image is in the PACS", lambda: stack.reports(study_id))
    assert len(reports) == 1
    done = stack.task(study_id)
    assert done is not None and done["status"] == "completed"
