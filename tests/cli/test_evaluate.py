"""`cxr evaluate` on the NIH sample: predictions from a CSV (synthetic, any model) and from
running the model on the images; JSON per finding and a report with plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from cxr_errors import ConfigError
from fhir_service.cli import app
from fhir_service.runtime import load_evaluation
from fhir_service.settings import Settings
from models.types import NIH_FINDINGS

SAMPLE = Settings().shared_dir / "data" / "nih-sample"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_dir: Path) -> Path:
    monkeypatch.setenv("CXR_MODEL_WEIGHTS", "untrained")
    monkeypatch.setenv("CXR_MODEL_BACKEND", "torch")
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def _manifest() -> list[dict[str, str]]:
    with (SAMPLE / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_predictions_csv_metrics_equal_scikit_learn_and_report(env: Path) -> None:
    rows = _manifest()
    rng = np.random.default_rng(0)
    y = np.array([[f in r["finding_labels"].split("|") for f in NIH_FINDINGS] for r in rows])
    probs = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1)
    path = env / "preds.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{f}" for f in NIH_FINDINGS)])
        writer.writerows(
            [r["file"], *(f"{p:.6f}" for p in row)] for r, row in zip(rows, probs, strict=True)
        )
    probs = np.round(probs, 6)
    out = env / "report"
    args = ["evaluate", "--predictions", str(path), "--labels", str(SAMPLE / "manifest.csv")]
    result = CliRunner().invoke(app, [*args, "--resamples", "200", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["images"] == 56 and doc["probability"] == "as given in the predictions file"
    assert [f["finding"] for f in doc["findings"]] == list(NIH_FINDINGS)
    for k, f in enumerate(doc["findings"]):
        assert f["positives"] == int(y[:, k].sum()) and f["n"] == 56
        assert abs(f["auroc"] - roc_auc_score(y[:, k], probs[:, k])) < 1e-9
        assert abs(f["auprc"] - average_precision_score(y[:, k], probs[:, k])) < 1e-9
        lo, hi = f["auroc_ci95"]
        assert lo <= f["auroc"] <= hi
        assert set(f["subgroups"]) == {"sex", "age", "view"}
        assert set(f["subgroups"]["view"]) <= {"PA", "AP"}
    report = (out / "report.md").read_text()
    assert "AUROC [95% CI]" in report and "Subgroup AUROC" in report
    for finding in NIH_FINDINGS:
        assert (out / f"roc-{finding}.png").read_bytes().startswith(b"\x89PNG")
        assert (out / f"reliability-{finding}.png").stat().st_size > 1000


def test_predictions_need_an_image_column(env: Path) -> None:
    path = env / "bad.csv"
    path.write_text("name,Atelectasis\nx.png,0.5\n")
    result = CliRunner().invoke(app, ["evaluate", "--predictions", str(path)])
    assert result.exit_code == 1 and "Image Index" in result.output


def test_images_run_the_model_with_localisation(env: Path) -> None:
    args = ["evaluate", "--images", str(SAMPLE), "--labels", str(SAMPLE / "manifest.csv")]
    result = CliRunner().invoke(app, [*args, "--resamples", "50", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["images"] == 56 and doc["refused"] == []
    assert doc["probability"] == "uncalibrated score"
    located = {f["finding"]: f["localisation"] for f in doc["findings"] if f["localisation"]}
    assert "Cardiomegaly" in located  # sample images carry NIH boxes for it
    cam, prior = located["Cardiomegaly"]["cam"], located["Cardiomegaly"]["centre_prior"]
    assert cam["boxes"] == prior["boxes"] >= 1
    assert set(cam["iobb_accuracy"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"}
    assert 0.0 <= cam["pointing_game"] <= 1.0
    # The same JSON is what the worker shows on the model card (CXR_MODEL_EVALUATION).
    assert len(doc["weights_sha256"]) == 64 and doc["model_version"].startswith("untrained-")
    saved = env / "evaluation.json"
    saved.write_text(result.stdout)
    evaluation = load_evaluation(saved)
    assert evaluation is not None and evaluation.weights_sha256 == doc["weights_sha256"]
    assert len(evaluation.findings) == len(NIH_FINDINGS)
    saved.write_text('{"findings": 3}')
    with pytest.raises(ConfigError, match="not a `cxr evaluate --json` result"):
        load_evaluation(saved)
