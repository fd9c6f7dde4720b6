"""The SR (TID 1500) and heatmap Segmentation built from a result, parsed back by highdicom."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from fhir_service.dicom.seg import HeatmapSegment, build_heatmap_segmentation, cam_to_fraction
from fhir_service.dicom.sr import Algorithm, SrFinding, build_sr
from tests.dicom.helpers import nih_png, part10, wrapped

ALGO = Algorithm("cxr-fhir test", "untrained-abc123", "ab" * 32, untrained=True)


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(part10(ds)))


def test_sr_holds_each_findings_score_flag_threshold_and_source(shared_dir: Path) -> None:
    source = wrapped(nih_png(shared_dir))
    findings = [
        SrFinding("Effusion", "60046008", "SCT", "Pleural effusion", 0.71, 0.5, True, False),
        SrFinding("Mass", "4147007", "SCT", "Mass", 0.12, 0.5, False, False),
    ]
    sr = _roundtrip(build_sr(source, findings, ALGO, key="k1"))
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = parsed.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Effusion", "Mass"]
    effusion = groups[0]
    values = {m.name.meaning: m.value for m in effusion.get_measurements()}
    assert values == {"Model output score": 0.71, "Operating threshold": 0.5}
    assert effusion.get_qualitative_evaluations()[0].value.meaning == "Present"
    assert groups[1].get_qualitative_evaluations()[0].value.meaning == "Absent"
    assert effusion.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    texts = {str(e.value) for e in sr.iterall() if e.keyword == "TextValue"}
    assert "cxr-fhir test (UNTRAINED - not for clinical use)" in texts
    assert f"weights-sha256={'ab' * 32}" in texts
    # Same key, same instance: a job that runs twice stores the same SR again.
    again = build_sr(source, findings, ALGO, key="k1")
    assert again.SOPInstanceUID == sr.SOPInstanceUID


def test_heatmap_segmentation_overlays_the_source(shared_dir: Path) -> None:
    source = wrapped(nih_png(shared_dir))
    cam = np.arange(49, dtype=np.float32).reshape(7, 7)
    seg = _roundtrip(
        build_heatmap_segmentation(
            source,
            [HeatmapSegment("Effusion", "60046008", "SCT", "Pleural effusion", cam)],
            ALGO,
            key="k1",
        )
    )
    parsed = hd.seg.Segmentation.from_dataset(seg)
    assert parsed.SegmentationType == "FRACTIONAL"
    assert parsed.get_segment_numbers(tracking_id="Effusion") == [1]
    refs = parsed.get_source_image_uids()
    assert any(r[2] == source.SOPInstanceUID for r in refs)
    assert (int(seg.Rows), int(seg.Columns)) == (int(source.Rows), int(source.Columns))


def test_cam_fraction_covers_the_centre_square_only() -> None:
    cam = np.ones((7, 7), dtype=np.float32)
    cam[3, 3] = 3.0
    frac = cam_to_fraction(cam, 100, 60)
    assert frac.shape == (100, 60)
    assert frac[:20].max() == 0.0 and frac[80:].max() == 0.0
    assert 0.8 < frac.max() <= 1.0  # bilinear: the peak cell is spread a little
    row, col = np.unravel_index(int(frac.argmax()), frac.shape)
    assert abs(row - 50) <= 5 and abs(col - 30) <= 5
