"""The ``cxr evaluate --out`` report: Markdown or HTML with ROC curves and reliability diagrams."""

from __future__ import annotations

import html as html_lib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_errors import InputError
from fhir_service.cli.evaluate import FINDING_COLUMNS, finding_rows, number
from models.evaluation import reliability_curve, roc_curve

if TYPE_CHECKING:
    from fhir_service.cli.evaluate import Predictions
    from fhir_service.ingest.nih import NihRecord

__all__ = ["write_report"]


def _plots(folder: Path, finding: str, y: np.ndarray, p: np.ndarray) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roc_name, rel_name = f"roc-{finding}.png", f"reliability-{finding}.png"
    fig, ax = plt.subplots(figsize=(4, 4))
    if y.any() and not y.all():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.5)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"ROC: {finding}")
    fig.tight_layout()
    fig.savefig(folder / roc_name, dpi=100)
    plt.close(fig)
    mean_p, freq, count = reliability_curve(p, y)
    fig, ax = plt.subplots(figsize=(4, 4))
    seen = count > 0
    ax.plot(mean_p[seen], freq[seen], "o-", lw=1.2)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set(xlabel="predicted", ylabel="observed frequency", title=f"Reliability: {finding}")
    fig.tight_layout()
    fig.savefig(folder / rel_name, dpi=100)
    plt.close(fig)
    return roc_name, rel_name


def _subgroup_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for f in result["findings"]:
        parts = []
        for attribute, groups in f["subgroups"].items():
            for group, m in groups.items():
                parts.append(
                    f"{attribute} {group}: {number(m['auroc'])} (n {m['n']}, +{m['positives']})"
                )
        lines.append(f"{f['finding']}: " + "; ".join(parts))
    return lines


def _localisation_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for f in result["findings"]:
        loc = f.get("localisation") or {}
        if not loc:
            continue
        cam, prior = loc["cam"], loc["centre_prior"]
        iobb = ", ".join(
            f"T={t}: {number(cam['iobb_accuracy'][t], 2)} vs {number(prior['iobb_accuracy'][t], 2)}"
            for t in cam["iobb_accuracy"]
        )
        hit, hit0 = number(cam["pointing_game"], 2), number(prior["pointing_game"], 2)
        lines.append(
            f"{f['finding']} ({cam['boxes']} boxes): pointing game {hit} vs centre prior {hit0}; "
            f"IoBB accuracy (CAM vs prior) {iobb}"
        )
    return lines


def write_report(
    folder: Path,
    result: dict[str, Any],
    preds: Predictions,
    truth: dict[str, NihRecord],
    *,
    html: bool = False,
) -> Path:
    """Write ``report.md`` (or ``report.html``) and one ROC and one reliability PNG per finding."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create report folder {folder}: {exc}") from exc
    keep = [i for i, n in enumerate(preds.names) if n in truth]
    names = [preds.names[i] for i in keep]
    figures = []
    for k, finding in enumerate(preds.findings):
        y = np.array([finding in truth[n].finding_labels for n in names])
        figures.append((finding, *_plots(folder, finding, y, preds.probabilities[keep, k])))
    title = f"cxr evaluate: {result['images']} images ({result['probability']})"
    intro = (
        f"Source {result['source']}; bootstrap {result['resamples']} stratified resamples, "
        f"seed {result['seed']}; {len(result['refused'])} images refused by the input gate."
    )
    if html:
        return _write_html(folder, title, intro, result, figures)
    lines = [f"# {title}", "", intro, "", "| " + " | ".join(FINDING_COLUMNS) + " |"]
    lines.append("|" + "---|" * len(FINDING_COLUMNS))
    lines += ["| " + " | ".join(row) + " |" for row in finding_rows(result)]
    lines += ["", "## Subgroup AUROC", ""] + [f"- {x}" for x in _subgroup_lines(result)]
    loc = _localisation_lines(result)
    if loc:
        lines += ["", "## Localisation (CAM vs centre-prior control)", ""] + [f"- {x}" for x in loc]
    lines += ["", "## Curves", ""]
    for finding, roc, rel in figures:
        lines.append(f"### {finding}\n\n![ROC {finding}]({roc}) ![reliability {finding}]({rel})\n")
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_html(
    folder: Path,
    title: str,
    intro: str,
    result: dict[str, Any],
    figures: list[tuple[str, str, str]],
) -> Path:
    e = html_lib.escape
    head = "".join(f"<th>{e(h)}</th>" for h in FINDING_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in finding_rows(result)
    )
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title><h1>{e(title)}</h1>",
        f"<p>{e(intro)}</p><table border='1'><tr>{head}</tr>{body}</table>",
        "<h2>Subgroup AUROC</h2><ul>"
        + "".join(f"<li>{e(x)}</li>" for x in _subgroup_lines(result))
        + "</ul>",
    ]
    loc = _localisation_lines(result)
    if loc:
        parts.append(
            "<h2>Localisation (CAM vs centre-prior control)</h2><ul>"
            + "".join(f"<li>{e(x)}</li>" for x in loc)
            + "</ul>"
        )
    for finding, roc, rel in figures:
        parts.append(f"<h3>{e(finding)}</h3><img src='{e(roc)}'><img src='{e(rel)}'>")
    path = folder / "report.html"
    path.write_text("\n".join(parts) + "\n")
    return path
