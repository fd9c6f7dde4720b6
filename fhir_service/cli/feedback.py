"""``cxr calibrate --from-feedback``: operating thresholds refitted from radiologists' reviews.

Reads every review the SMART app wrote (:mod:`fhir_service.fhir.feedback`) from the FHIR
server, keeps the decisions on AI Observations of the current weights, refits each finding's
threshold where there are enough (:mod:`models.feedback`), prints sensitivity/specificity
before and after, and writes the calibration file pinned to the weights' sha256 — or says
why not and changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from cxr_errors import ConfigError
from fhir_service.cli._common import console
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.feedback import Decision, FeedbackSet, decisions_from, feedback_search_params
from fhir_service.settings import Settings

_MAX_PAGES = 1000


def _all_pages(client: FhirClient, params: dict[str, str]) -> list[dict[str, Any]]:
    """Every resource of the search, included ones too (``search_all`` keeps matches only)."""
    found: list[dict[str, Any]] = []
    bundle = client.search("Observation", params)
    for _ in range(_MAX_PAGES):
        found += [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
        nxt = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
        if not nxt:
            break
        bundle = dict(client.request("GET", nxt.replace(client.base_url + "/", "")).json())
    return found


def collect(settings: Settings, weights_version: str) -> FeedbackSet:
    with FhirClient(settings.fhir_base_url, timeout=120.0) as client:
        resources = _all_pages(client, feedback_search_params())
    return decisions_from(resources, weights_version=weights_version)


def _by_finding(decisions: list[Decision]) -> dict[str, Any]:
    from models.feedback import FindingDecisions

    grouped: dict[str, list[Decision]] = defaultdict(list)
    for d in decisions:
        grouped[d.finding].append(d)
    return {
        name: FindingDecisions(
            logits=np.array([d.logit for d in ds], dtype=np.float64),
            labels=np.array([d.label for d in ds], dtype=np.int64),
            ai_values=np.array([d.ai_value for d in ds], dtype=np.float64),
            ai_thresholds=np.array([d.ai_threshold for d in ds], dtype=np.float64),
        )
        for name, ds in grouped.items()
    }


def _print(rows: list[Any], feedback: FeedbackSet, weights_version: str, minimum: int) -> None:
    table = Table(
        title=f"radiologist decisions on {weights_version} "
        f"(sensitivity/specificity against those same decisions)"
    )
    for col in ("finding", "pos", "neg", "sens before", "spec before", "threshold after"):
        table.add_column(col, justify="left" if col == "finding" else "right")
    table.add_column("sens after", justify="right")
    table.add_column("spec after", justify="right")
    table.add_column("", justify="left")

    def pct(x: float) -> str:
        return "–" if x != x else f"{x:.2f}"

    for r in rows:
        table.add_row(
            r.finding,
            str(r.n_positive),
            str(r.n_negative),
            pct(r.sensitivity_before),
            pct(r.specificity_before),
            "–" if r.threshold_after is None else f"{r.threshold_after:.3f}",
            pct(r.sensitivity_after),
            pct(r.specificity_after),
            r.note,
        )
    console.print(table)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(feedback.skipped.items()))
    console.print(
        f"{len(feedback.decisions)} decisions used" + (f"; not used: {skipped}" if skipped else "")
    )
    console.print(
        f"A threshold is refitted only with at least {minimum} positive and {minimum} negative "
        "decisions for its finding: with fewer, one case moves sensitivity by more than ten "
        "points and the optimum jumps with it."
    )


def calibrate_from_feedback(
    settings: Settings,
    *,
    out: Path | None,
    min_decisions: int,
    target_sensitivity: float | None,
) -> bool:
    """Refit and write; False (nothing written) when no finding has enough decisions."""
    from models.calibration import Calibration
    from models.feedback import refit_thresholds
    from models.registry import resolve_weights

    loaded = resolve_weights(
        settings.model_weights,
        cache_dir=settings.weights_cache_dir,
        sha256=settings.weights_sha256,
        allow_download=settings.weights_download,
    )
    current_file = settings.resolved_calibration_file
    current = Calibration.load(current_file) if current_file else Calibration.identity()
    if current.weights_sha256 and current.weights_sha256 != loaded.sha256:
        raise ConfigError(
            f"calibration file {current_file} is for weights sha256 {current.weights_sha256}, "
            f"not the current {loaded.sha256}: refit it from labelled images first"
        )
    feedback = collect(settings, loaded.model_version)
    calibration, rows = refit_thresholds(
        current,
        _by_finding(feedback.decisions),
        weights_name=loaded.model_version.split("@")[0],
        weights_sha256=loaded.sha256,
        min_decisions=min_decisions,
        target_sensitivity=target_sensitivity,
        meta={"source": f"radiologist feedback from {settings.fhir_base_url}"},
    )
    _print(rows, feedback, loaded.model_version, min_decisions)
    if calibration is None:
        console.print(
            "[bold]no finding has enough decisions: nothing changed[/] "
            f"({current_file or 'no calibration file'} stays as it is)"
        )
        return False
    target = out or current_file or settings.default_calibration_file
    calibration.save(target)
    if loaded.untrained:
        console.print("[bold yellow]refitted for an UNTRAINED model: for testing only.[/]")
    console.print(
        f"wrote {target} (calibration {calibration.version}, weights sha256 {loaded.sha256})"
    )
    return True
