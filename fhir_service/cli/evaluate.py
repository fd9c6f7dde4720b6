"""``cxr evaluate``: how good is the model on labelled data (models/evaluation.py does the maths).

Predictions come from ``--predictions CSV`` (any model: an ``Image Index`` column and one
probability column per finding, NIH spelling, optionally ``prob_``-prefixed) or from running
the configured model on ``--images DIR``. Labels are NIH's Data_Entry_2017_v2020 (the copy in
torchxrayvision unless ``--labels``), boxes its BBox_List_2017 (``--boxes``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cxr_errors import CxrError, InputError
from fhir_service.cli._common import cli_errors, console, err_console
from fhir_service.ingest.nih import (
    BoundingBox,
    NihRecord,
    default_bbox_path,
    default_metadata_path,
    read_bboxes,
)
from fhir_service.ingest.rows import Row, read_rows
from fhir_service.settings import Settings
from models.evaluation import (
    Box,
    FindingMetrics,
    LocalisationMetrics,
    age_band,
    centre_prior,
    evaluate_finding,
    localisation_metrics,
)
from models.types import NIH_FINDINGS

__all__ = ["register"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}
#: NIH boxes are in the pixels of the 1024² PNGs NIH distributes
_NIH_SIDE = 1024.0


@dataclass
class Predictions:
    """Probabilities [N, K] for ``findings`` of the images ``names`` (and, from images, CAMs)."""

    names: list[str]
    findings: list[str]
    probabilities: npt.NDArray[np.float64]
    thresholds: dict[str, float] = field(default_factory=dict)
    heatmaps: dict[tuple[str, str], npt.NDArray[np.float32]] = field(default_factory=dict)
    """(image, finding) → heatmap in image pixels, for the boxed ones"""
    refused: list[str] = field(default_factory=list)
    source: str = ""
    calibrated: bool | None = None
    """None: another model's numbers, whose calibration we cannot know"""
    model_version: str | None = None
    weights_sha256: str | None = None
    """of the model that made the numbers (None: another model's, from a CSV)"""


@contextmanager
def _progress(description: str, total: int, quiet: bool) -> Iterator[Any]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, disable=quiet, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _labels(path: Path | None) -> dict[str, NihRecord]:
    source = path or default_metadata_path()
    return {item.rec.image_index: item.rec for item in read_rows(source) if isinstance(item, Row)}


def _boxes(path: Path | None, wanted: set[str]) -> dict[str, list[tuple[str, Box]]]:
    source = path or default_bbox_path()
    out: dict[str, list[tuple[str, Box]]] = {}
    for item in read_bboxes(source):
        if isinstance(item, BoundingBox) and item.image_index in wanted:
            box = Box(item.x, item.y, item.width, item.height)
            out.setdefault(item.image_index, []).append((item.finding, box))
    return out


def _column_for(finding: str, header: list[str]) -> str | None:
    for name in (
        finding,
        f"prob_{finding}",
        finding.replace("_", " "),
        f"prob_{finding.replace('_', ' ')}",
    ):
        if name in header:
            return name
    return None


def read_predictions(path: Path) -> Predictions:
    """The predictions CSV: ``Image Index`` and one probability column per finding."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as exc:
        raise InputError(f"cannot read predictions {path}: {exc}") from exc
    key = next((k for k in ("Image Index", "file", "image") if k in header), None)
    if key is None:
        raise InputError(f"{path}: needs an 'Image Index' column, has {header[:6]}")
    columns = {f: c for f in NIH_FINDINGS if (c := _column_for(f, header)) is not None}
    if not columns:
        raise InputError(f"{path}: no probability column named after an NIH finding")
    findings = list(columns)
    try:
        probs = np.array([[float(r[columns[f]]) for f in findings] for r in rows], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: a probability is not a number: {exc}") from exc
    if probs.size and (not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1):
        raise InputError(f"{path}: probabilities must be finite and within [0, 1]")
    names = [Path(r[key]).name for r in rows]
    return Predictions(names, findings, probs.reshape(len(rows), len(findings)), source=str(path))


def _image_heatmap(
    cam: npt.NDArray[np.float32], height: int, width: int
) -> npt.NDArray[np.float32]:
    """A 7×7 CAM in the pixels of the whole image: the model saw the centre square."""
    from models.heatmap import upsample_cam
    from models.preprocess import center_square

    top, left, side = center_square(height, width)
    full = np.full((height, width), float(cam.min()), np.float32)
    full[top : top + side, left : left + side] = upsample_cam(cam, side)
    return full


def predict_images(
    folder: Path, labels: dict[str, NihRecord], boxed: set[str], quiet: bool
) -> Predictions:
    """Run the configured model on every labelled image under ``folder``."""
    from fhir_service.runtime import build_classifier

    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.name in labels
    )
    if not files:
        raise InputError(
            f"no labelled images (PNG, JPEG, DICOM named as in the labels) in {folder}"
        )
    classifier = build_classifier(Settings(), tta=False)
    out = Predictions([], list(NIH_FINDINGS), np.zeros((0, len(NIH_FINDINGS))), source=str(folder))
    out.thresholds = {f: float(t) for f, t in zip(NIH_FINDINGS, classifier.thresholds, strict=True)}
    out.calibrated = not classifier.calibration.is_identity
    out.model_version, out.weights_sha256 = classifier.model_version, classifier.weights_sha256
    rows: list[list[float]] = []
    with _progress("scoring images", len(files), quiet) as advance:
        for path in files:
            advance()
            try:
                decoded = classifier.preprocess.decode(path)
                (analysis,) = classifier.analyze([decoded])
            except CxrError as exc:
                out.refused.append(f"{path.name}: {exc.message}")
                continue
            out.names.append(path.name)
            rows.append([f.calibrated_probability for f in analysis.findings])
            if path.name in boxed:
                for k, finding in enumerate(NIH_FINDINGS):
                    out.heatmaps[(path.name, finding)] = _image_heatmap(
                        analysis.cams[k], decoded.height, decoded.width
                    )
    out.probabilities = np.array(rows, dtype=np.float64).reshape(len(rows), len(NIH_FINDINGS))
    return out


def _localise(
    preds: Predictions, boxes: dict[str, list[tuple[str, Box]]]
) -> dict[str, dict[str, LocalisationMetrics]]:
    cam_pairs: dict[str, list[tuple[Any, Box]]] = {f: [] for f in NIH_FINDINGS}
    prior_pairs: dict[str, list[tuple[Any, Box]]] = {f: [] for f in NIH_FINDINGS}
    for name, items in boxes.items():
        for finding, box in items:
            heat = preds.heatmaps.get((name, finding))
            if heat is None:
                continue
            h, w = heat.shape
            sx, sy = w / _NIH_SIDE, h / _NIH_SIDE
            scaled = Box(box.x * sx, box.y * sy, box.width * sx, box.height * sy)
            cam_pairs[finding].append((heat, scaled))
            prior_pairs[finding].append((centre_prior(h, w), scaled))
    return {
        f: {
            "cam": localisation_metrics(f, cam_pairs[f]),
            "centre_prior": localisation_metrics(f, prior_pairs[f]),
        }
        for f in NIH_FINDINGS
        if cam_pairs[f]
    }


def _groups(names: list[str], labels: dict[str, NihRecord]) -> dict[str, list[str | None]]:
    recs = [labels[n] for n in names]
    return {
        "sex": [r.sex for r in recs],
        "age": [age_band(float(r.age_years)) for r in recs],
        "view": [r.view_position for r in recs],
    }


def _load_thresholds(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read thresholds {path}: {exc}") from exc
    classes = doc.get("classes", doc) if isinstance(doc, dict) else {}
    out = {}
    for finding, value in classes.items():
        t = value.get("threshold") if isinstance(value, dict) else value
        if isinstance(t, int | float) and math.isfinite(t):
            out[finding] = float(t)
    return out


def evaluate(
    images: Path | None = typer.Option(None, "--images", help="Run the configured model here."),
    predictions: Path | None = typer.Option(
        None, "--predictions", help="CSV: 'Image Index' + one probability column per finding."
    ),
    labels: Path | None = typer.Option(
        None, "--labels", help="NIH Data_Entry_2017 (default: torchxrayvision's copy) or manifest."
    ),
    boxes: Path | None = typer.Option(None, "--boxes", help="NIH BBox_List_2017 (default: ours)."),
    no_boxes: bool = typer.Option(False, "--no-boxes", help="Skip the localisation measures."),
    thresholds: Path | None = typer.Option(
        None, "--thresholds", help="JSON finding → threshold (a calibration file works)."
    ),
    resamples: int = typer.Option(1000, "--resamples", min=0, help="Bootstrap resamples."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON, one entry per finding."),
    out: Path | None = typer.Option(None, "--out", help="Write a report with plots here."),
    html: bool = typer.Option(False, "--html", help="The report as HTML (default Markdown)."),
) -> None:
    """AUROC (95 % bootstrap CI), AUPRC, ECE, Brier, operating points, subgroups, localisation."""
    if (images is None) == (predictions is None):
        err_console.print("[bold red]error:[/] give exactly one of --images DIR, --predictions CSV")
        raise typer.Exit(2)
    with cli_errors():
        truth = _labels(labels)
        wanted_boxes = not no_boxes and images is not None
        box_map = _boxes(boxes, set(truth)) if wanted_boxes else {}
        if images is not None:
            preds = predict_images(images, truth, set(box_map), as_json)
        else:
            assert predictions is not None
            preds = read_predictions(predictions)
        preds.thresholds.update(_load_thresholds(thresholds))
        result = _evaluate(preds, truth, box_map, resamples, seed, as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2, allow_nan=True))
    else:
        _print(result)
    if out is not None:
        from fhir_service.cli.evaluate_report import write_report

        with cli_errors():
            report = write_report(out, result, preds, truth, html=html)
        (err_console if as_json else console).print(f"wrote {report}")


def _evaluate(
    preds: Predictions,
    truth: dict[str, NihRecord],
    boxes: dict[str, list[tuple[str, Box]]],
    resamples: int,
    seed: int,
    quiet: bool,
) -> dict[str, Any]:
    known = [i for i, n in enumerate(preds.names) if n in truth]
    if len(known) < 2:
        raise InputError(
            f"fewer than 2 predicted images have labels ({len(preds.names)} predicted)"
        )
    names = [preds.names[i] for i in known]
    probs = preds.probabilities[known]
    groups = _groups(names, truth)
    metrics: list[FindingMetrics] = []
    with _progress("bootstrap", resamples * len(preds.findings), quiet) as advance:
        for k, finding in enumerate(preds.findings):
            y = np.array([finding in truth[n].finding_labels for n in names])
            metrics.append(
                evaluate_finding(
                    finding,
                    y,
                    probs[:, k],
                    threshold=preds.thresholds.get(finding),
                    groups=groups,
                    resamples=resamples,
                    seed=seed + k,
                    progress=advance,
                )
            )
    localisation = _localise(preds, boxes) if boxes else {}
    return {
        "source": preds.source,
        "images": len(names),
        "unlabelled": len(preds.names) - len(names),
        "refused": preds.refused,
        "probability": (
            "as given in the predictions file"
            if preds.calibrated is None
            else "calibrated probability"
            if preds.calibrated
            else "uncalibrated score"
        ),
        # The model card shows an evaluation only of the weights it describes.
        "model_version": preds.model_version,
        "weights_sha256": preds.weights_sha256,
        "resamples": resamples,
        "seed": seed,
        "findings": [
            m.to_json()
            | {"localisation": {k: v.to_json() for k, v in localisation.get(m.finding, {}).items()}}
            for m in metrics
        ],
    }


def number(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def finding_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row of :data:`FINDING_COLUMNS` per finding (the terminal table and the report)."""
    rows = []
    for f in result["findings"]:
        op = f["operating_point"] or {}
        lo, hi = f["auroc_ci95"]
        rows.append(
            [
                f["finding"],
                str(f["n"]),
                str(f["positives"]),
                number(f["prevalence"]),
                f"{number(f['auroc'])} [{number(lo)}, {number(hi)}]",
                number(f["auprc"]),
                number(f["ece"]),
                number(f["brier"]),
                f"{op['threshold']:.4g}" if op else "—",
                number(op.get("sensitivity")),
                number(op.get("specificity")),
                number(op.get("ppv")),
                number(op.get("npv")),
            ]
        )
    return rows


FINDING_COLUMNS = ["finding", "n", "positives", "prevalence", "AUROC [95% CI]", "AUPRC",
                   "ECE (15 bins)", "Brier", "threshold", "sensitivity", "specificity", "PPV",
                   "NPV"]  # fmt: skip


def _print(result: dict[str, Any]) -> None:
    table = Table(
        title=f"{result['images']} images from {result['source']} ({result['probability']})"
    )
    for col in FINDING_COLUMNS:
        table.add_column(col, justify="left" if col == "finding" else "right")
    for row in finding_rows(result):
        table.add_row(*row)
    console.print(table)
    for f in result["findings"]:
        loc = f.get("localisation") or {}
        if loc:
            cam, prior = loc["cam"], loc["centre_prior"]
            hit, hit0 = number(cam["pointing_game"], 2), number(prior["pointing_game"], 2)
            acc, acc0 = (number(x["iobb_accuracy"]["0.1"], 2) for x in (cam, prior))
            console.print(
                f"{f['finding']}: {cam['boxes']} boxes, pointing game CAM {hit} vs centre prior "
                f"{hit0}; IoBB≥0.1 accuracy {acc} vs {acc0}"
            )
    for line in result["refused"]:
        err_console.print(f"[yellow]refused[/] {line}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
