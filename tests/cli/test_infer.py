"""`cxr infer` on a real NIH image and a DICOM; `cxr calibrate` writes what infer picks up."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fhir_service.cli import app
from fhir_service.settings import Settings

SHARED = Settings().shared_dir / "data"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_dir: Path) -> Path:
    # shared_dir (tests/conftest.py) fails the test, not skips it, when the data is missing.
    monkeypatch.setenv("CXR_MODEL_WEIGHTS", "untrained")
    monkeypatch.setenv("CXR_MODEL_BACKEND", "torch")  # no export: keeps the test lean
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_infer_png_and_dicom_writes_overlays(env: Path) -> None:
    png = SHARED / "nih-sample" / "00000013_004.png"
    dcm = SHARED / "dicom" / "RG1_J2KI.dcm"
    out = env / "out"
    result = CliRunner().invoke(app, ["infer", str(png), str(dcm), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout)
    assert [Path(r["image"]).name for r in reports] == [png.name, dcm.name]
    for r in reports:
        assert r["untrained"] and "untrained" in r["model_version"]
        assert len(r["findings"]) == 14 and r["overlays"]
        for overlay in r["overlays"]:
            assert Path(overlay).is_file() and Path(overlay).stat().st_size <= 100_000


def test_infer_table_and_bad_image(env: Path) -> None:
    bad = env / "bad.png"
    bad.write_text("not an image")
    png = SHARED / "nih-sample" / "00000013_004.png"
    result = CliRunner().invoke(app, ["infer", str(png), str(bad), "--out", str(env / "o")])
    assert result.exit_code == 1
    assert "UNTRAINED" in result.output and "Atelectasis" in result.output
    assert "not a recognised image format" in result.output
    assert not (env / "o" / "bad").exists()


def test_calibrate_then_infer_uses_it(env: Path) -> None:
    with (SHARED / "nih-sample" / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[:20]
    labels = env / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "finding_labels"])
        writer.writeheader()
        writer.writerows({"file": r["file"], "finding_labels": r["finding_labels"]} for r in rows)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "calibrate", "--labels", str(labels), "--images", str(SHARED / "nih-sample"),
            "--min-positives", "2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = re.sub(r"\s+", " ", result.output)  # rich wraps at the terminal width
    assert "ECE" in printed and "held-out images" in printed
    assert "left uncalibrated" in printed  # 8 findings have 1 positive among 14 fit images
    written = env / "data" / "models" / "calibration-untrained.json"
    assert written.is_file()
    png = SHARED / "nih-sample" / rows[0]["file"]
    result = runner.invoke(app, ["infer", str(png), "--out", str(env / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)[0]
    assert "+cal2-" in report["model_version"]
    kinds = {f["score_kind"] for f in report["findings"]}
    assert kinds == {"calibrated probability", "uncalibrated score"}
    for f in report["findings"]:
        key = (
            "calibrated_probability" if f["score_kind"].startswith("cal") else "uncalibrated_score"
        )
        assert key in f


def test_infer_without_calibration_never_says_calibrated_and_marks_untrained_clip(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_CLIP_WEIGHTS", "untrained")
    monkeypatch.setenv("CXR_CLIP_BACKEND", "torch")
    png = SHARED / "nih-sample" / "00000013_004.png"
    result = CliRunner().invoke(
        app, ["infer", str(png), "--out", str(env / "o"), "--json", "--clip"]
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"(?<!un)calibrated", result.stdout, re.IGNORECASE) is None
    (report,) = json.loads(result.stdout)
    assert report["clip_untrained"] is True and "untrained" in report["clip_model_version"]
    assert {f["score_kind"] for f in report["findings"]} == {"uncalibrated score"}
    # TTA on, no calibration: the band is the augmented-view spread
    assert {f["band_kind"] for f in report["findings"]} == {"tta-spread"}
