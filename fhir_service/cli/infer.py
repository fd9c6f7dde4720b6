"""``cxr infer`` and ``cxr calibrate``: settings wired into ``models``, results presented."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from cxr_errors import CxrError, InputError
from fhir_service.cli._common import cli_errors, console, err_console
from fhir_service.fhir.results import band_text, score_name
from fhir_service.runtime import build_classifier, build_clip
from fhir_service.settings import Settings

__all__ = ["register"]

_NO_FINDING = "No Finding"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def infer(
    images: list[Path] = typer.Argument(..., help="PNG, JPEG or DICOM files."),
    out: Path = typer.Option(Path("cxr-out"), "--out", help="Directory for the overlay PNGs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    all_overlays: bool = typer.Option(
        False, "--all-overlays", help="Write all 14 overlays (default: flagged findings + top 1)."
    ),
    clip: bool = typer.Option(False, "--clip", help="Add CLIP zero-shot tags."),
) -> None:
    """Score chest X-rays: score, band and flag per finding; write CAM overlays."""
    from models.heatmap import overlay_pngs

    settings = Settings()
    with cli_errors():
        classifier = build_classifier(settings)
        encoder = build_clip(settings) if clip else None
    failed = 0
    reports: list[dict[str, Any]] = []
    for path in images:
        try:
            decoded = classifier.preprocess.decode(path)
            analysis = classifier.analyze([decoded])[0]
            tags = encoder.analyze([decoded])[0].tags if encoder is not None else ()
            ranked = sorted(
                range(len(analysis.findings)),
                key=lambda k: -analysis.findings[k].calibrated_probability,
            )
            chosen = [
                k for k in ranked if all_overlays or analysis.findings[k].positive or k == ranked[0]
            ]
            pngs = overlay_pngs(decoded, analysis.cams[chosen])
            rendered = {
                analysis.findings[k].finding: png for k, png in zip(chosen, pngs, strict=True)
            }
        except CxrError as exc:
            failed += 1
            err_console.print(f"[bold red]error:[/] {exc.message}")
            continue
        folder = out / _safe(path.stem)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for finding, png in rendered.items():
            target = folder / f"{_safe(finding)}.png"
            target.write_bytes(png)
            written.append(str(target))
        reports.append(_report(path, analysis, tags, written, encoder))
        if not as_json:
            _print_table(path, analysis, tags, written, encoder)
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
    if failed:
        raise typer.Exit(1)


def _finding_json(f: Any) -> dict[str, Any]:
    # The score is a probability only where a calibration was fitted; the key says which.
    key = "calibrated_probability" if f.calibrated else "uncalibrated_score"
    out = {"finding": f.finding, "logit": f.logit, "sigmoid_score": f.sigmoid_score}
    out[key] = f.calibrated_probability
    out["score_kind"] = score_name(f)
    out["band_kind"] = f.band_kind
    if f.has_band:
        out["band_low"], out["band_high"] = f.band_low, f.band_high
    return out | {"threshold": f.threshold, "positive": f.positive}


def _report(
    path: Path, analysis: Any, tags: Any, overlays: list[str], encoder: Any
) -> dict[str, Any]:
    report = {
        "image": str(path),
        "model_version": analysis.model_version,
        "untrained": analysis.untrained,
        "weights_sha256": analysis.weights_sha256,
        "findings": [_finding_json(f) for f in analysis.findings],
        "extra_findings": analysis.extra_findings,
        "clip_tags": [{"finding": t.finding, "score": t.score} for t in tags],
        "overlays": overlays,
    }
    if encoder is not None:
        report["clip_model_version"] = encoder.model_version
        report["clip_untrained"] = encoder.untrained
    return report


def _print_table(path: Path, analysis: Any, tags: Any, overlays: list[str], encoder: Any) -> None:
    title = f"{path.name} — {analysis.model_version}"
    if analysis.untrained:
        console.print(
            "[bold yellow]UNTRAINED MODEL: random weights, these numbers are not findings.[/]"
        )
    table = Table(title=title)
    table.add_column("finding")
    table.add_column("score", justify="right")
    table.add_column("kind")
    table.add_column("band", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("flag")
    for f in sorted(analysis.findings, key=lambda f: -f.calibrated_probability):
        table.add_row(
            f.finding,
            f"{f.calibrated_probability:.3f}",
            score_name(f),
            band_text(f) or "none computed",
            f"{f.threshold:.4g}",
            "[bold red]FLAG[/]" if f.positive else "",
        )
    console.print(table)
    if tags:
        top = ", ".join(f"{t.finding} {t.score:.2f}" for t in tags[:3])
        marker = (
            " (UNTRAINED CLIP: not a finding)" if encoder is not None and encoder.untrained else ""
        )
        console.print(f"CLIP tags{marker}: {top}")
    console.print(f"overlays: {', '.join(overlays)}")


def _read_labels(labels: Path, images: Path) -> tuple[list[Path], np.ndarray]:
    from models.types import NIH_FINDINGS

    try:
        with labels.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"cannot read labels file {labels}: {exc}") from exc
    if not rows or "file" not in rows[0] or "finding_labels" not in rows[0]:
        raise InputError(f"{labels}: needs the columns 'file' and 'finding_labels'")
    paths: list[Path] = []
    matrix: list[list[float]] = []
    missing: list[str] = []
    for row in rows:
        names = {n.strip() for n in row["finding_labels"].split("|") if n.strip()}
        unknown = names - set(NIH_FINDINGS) - {_NO_FINDING}
        if unknown:
            raise InputError(f"{labels}: {row['file']} has unknown labels {sorted(unknown)}")
        path = images / row["file"]
        if not path.is_file():
            missing.append(row["file"])
            continue
        paths.append(path)
        matrix.append([1.0 if f in names else 0.0 for f in NIH_FINDINGS])
    if missing:
        err_console.print(f"[yellow]skipped {len(missing)} listed files not in {images}[/]")
    if len(paths) < 2:
        raise InputError(f"{labels}: fewer than 2 labelled images found in {images}")
    return paths, np.array(matrix)


def calibrate(
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV with columns file, finding_labels."
    ),
    images: Path | None = typer.Option(
        None, "--images", help="Directory holding the listed images."
    ),
    from_feedback: bool = typer.Option(
        False,
        "--from-feedback",
        help="Refit thresholds from radiologists' agree/disagree reviews in FHIR instead.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Calibration file; default the one `cxr infer` picks up."
    ),
    target_sensitivity: float = typer.Option(
        0.90, "--target-sensitivity", min=0.01, max=1.0, help="Thresholds reach this sensitivity."
    ),
    youden: bool = typer.Option(False, "--youden", help="Thresholds by Youden's J instead."),
    holdout: float = typer.Option(0.3, "--holdout", min=0.0, max=0.9, help="Held-out share."),
    min_positives: int = typer.Option(10, "--min-positives", min=1, help="Else uncalibrated."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split."),
) -> None:
    """Fit per-finding temperature + bias and thresholds; ECE/Brier before/after on held-out.

    With --from-feedback: refit each finding's threshold from the radiologists' decisions in
    FHIR (at least --min-positives positive and negative ones per finding)."""
    from models.calibration import fit_calibration

    settings = Settings()
    target = None if youden else target_sensitivity
    if from_feedback:
        with cli_errors():
            _from_feedback(settings, out, min_positives, target)
        return
    if labels is None or images is None:
        raise typer.BadParameter("give --labels and --images, or --from-feedback")
    with cli_errors():
        paths, y = _read_labels(labels, images)
        classifier = build_classifier(settings, tta=False, calibrated=False)
        logits, kept = _labelled_logits(classifier, paths, settings.model_batch_size)
        calibration = fit_calibration(
            logits,
            y[kept],
            weights_name=classifier.loaded.model_version.split("@")[0],
            weights_sha256=classifier.weights_sha256,
            meta={"labels": str(labels), "images": str(images)},
            holdout=holdout,
            target_sensitivity=target,
            min_positives=min_positives,
            seed=seed,
        )
        written = out or settings.default_calibration_file
        calibration.save(written)
    _print_calibration(calibration, len(kept))
    if classifier.untrained:
        console.print("[bold yellow]fitted on an UNTRAINED model: for testing only.[/]")
    console.print(f"wrote {written} (for weights sha256 {calibration.weights_sha256})")


def _from_feedback(
    settings: Settings, out: Path | None, min_decisions: int, target_sensitivity: float | None
) -> None:
    from fhir_service.cli.feedback import calibrate_from_feedback

    calibrate_from_feedback(
        settings, out=out, min_decisions=min_decisions, target_sensitivity=target_sensitivity
    )


def _labelled_logits(classifier: Any, paths: list[Path], batch: int) -> tuple[Any, list[int]]:
    """The logits of every image the model can read, and which of ``paths`` they are."""
    import torch

    tensors, kept = [], []
    for i, path in enumerate(paths):
        try:
            tensors.append(classifier.preprocess(path))
            kept.append(i)
        except InputError as exc:  # refused by the input gate, or undecodable
            err_console.print(f"[yellow]skipped[/] {exc.message}")
    if len(kept) < 2:
        raise InputError("fewer than 2 usable labelled images")
    logits = [
        classifier.logits(torch.stack(tensors[start : start + batch]))
        for start in range(0, len(tensors), batch)
    ]
    return np.concatenate(logits), kept


def _print_calibration(calibration: Any, n: int) -> None:
    held_out = next((c.n_validation for c in calibration.classes.values() if c.calibrated), 0)
    table = Table(
        title=f"calibration {calibration.version} on {n} images "
        f"(ECE, Brier, sensitivity and specificity on {held_out} held-out images)"
    )
    for col in ("finding", "n+", "T", "bias", "ECE before", "ECE after", "Brier before",
                "Brier after", "threshold", "rule", "sens", "spec"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("finding", "rule") else "right")
    skipped = []
    for name, fit in calibration.classes.items():
        if not fit.calibrated:
            skipped.append(f"{name}: {fit.note}")
            table.add_row(name, str(fit.n_positive), "—", "—", *["—"] * 6, "uncalibrated", "—", "—")
            continue
        table.add_row(
            name,
            str(fit.n_positive),
            f"{fit.temperature:.3f}",
            f"{fit.bias:+.3f}",
            f"{fit.ece_before:.4f}",
            f"{fit.ece_after:.4f}",
            f"{fit.brier_before:.4f}",
            f"{fit.brier_after:.4f}",
            f"{fit.threshold:.4g}",
            fit.threshold_rule,
            f"{fit.validation_sensitivity:.3f}",
            f"{fit.validation_specificity:.3f}",
        )
    console.print(table)
    for line in skipped:
        console.print(f"[yellow]{line}[/]")


def register(app: typer.Typer) -> None:
    """Add the model commands to the root app."""
    app.command("infer")(infer)
    app.command("calibrate")(calibrate)
