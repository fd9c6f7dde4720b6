"""The model card: a ``DocumentReference`` about the algorithm's Device (intended use, training
data, evaluation, limitations), which each result's Provenance names.

The card is Markdown in the attachment. Its identifier is the Device's version plus a digest
of its text, so a new evaluation (or new weights, which make a new Device) gives a new card
while the same inputs always give the same one. Evaluation numbers come from ``cxr evaluate
--json`` (``CXR_MODEL_EVALUATION``) and are shown only when that evaluation ran these weights;
in untrained mode the card says first that the model is not for clinical use.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhir_service.fhir.datatypes import conditional_create, identifier_condition, ref, urn
from fhir_service.fhir.terminology import Resource, Terminology
from models.types import ImageAnalysis

__all__ = ["FindingEvaluation", "ModelEvaluation", "model_card_entry", "model_card_markdown"]

UNTRAINED_HEADLINE = "**UNTRAINED — NOT FOR CLINICAL USE.** These weights were never trained"

#: What each registry weights name was trained on (torchxrayvision's model documentation).
_TRAINING_DATA = {
    "densenet121-res224-nih": (
        "NIH ChestX-ray14 (112,120 frontal radiographs of 30,805 patients, NIH Clinical "
        "Center, 1992–2015), labels mined from the radiology reports by NLP, images at "
        "224×224 (torchxrayvision `densenet121-res224-nih`)."
    ),
    "densenet121-res224-all": (
        "NIH ChestX-ray14, CheXpert, MIMIC-CXR, PadChest, RSNA Pneumonia, Google NIH "
        "relabels, OpenI and Kaggle datasets together, images at 224×224 (torchxrayvision "
        "`densenet121-res224-all`); 18 outputs, of which the 14 NIH findings are reported."
    ),
}
_INTENDED_USE = (
    "Triage support for frontal (PA or AP) adult chest radiographs: one score per NIH "
    "ChestX-ray14 finding, an operating threshold for each, and class activation maps "
    "showing where the model looked. Every result is preliminary until a radiologist "
    "reviews it; it is not a diagnosis."
)
_LIMITATIONS = (
    "The input gate refuses lateral views, non-DX/CR modalities, colour, tiny, near-constant "
    "and noise images; anything else that is not a chest radiograph may still be scored.",
    "The NIH labels were mined from reports by NLP and are noisy; findings such as Hernia "
    "have few training examples.",
    "Scores are the model's sigmoid outputs, not probabilities, unless a calibration was "
    "fitted (each Observation says which); a calibration holds only for the population it "
    "was fitted on.",
    "Heatmaps explain a score; they are not segmentations of the finding.",
    "Not validated for children, portable ICU films, or images with devices and lines, "
    "whose distribution differs from the training data.",
)


@dataclass(frozen=True)
class FindingEvaluation:
    finding: str
    n: int
    positives: int
    auroc: float
    auroc_ci95: tuple[float, float]


@dataclass(frozen=True)
class ModelEvaluation:
    """The part of a ``cxr evaluate --json`` result the model card shows."""

    source: str
    images: int
    weights_sha256: str | None
    findings: tuple[FindingEvaluation, ...]

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelEvaluation:
        """Parse ``cxr evaluate --json`` output; ValueError when it is not that."""
        try:
            findings = tuple(
                FindingEvaluation(
                    finding=str(f["finding"]),
                    n=int(f["n"]),
                    positives=int(f["positives"]),
                    auroc=float(f["auroc"]),
                    auroc_ci95=(float(f["auroc_ci95"][0]), float(f["auroc_ci95"][1])),
                )
                for f in doc["findings"]
            )
            sha = doc.get("weights_sha256")
            return cls(str(doc["source"]), int(doc["images"]), str(sha) if sha else None, findings)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not a `cxr evaluate --json` result: {exc!r}") from exc


def _number(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"


def _evaluation_section(analysis: ImageAnalysis, evaluation: ModelEvaluation | None) -> list[str]:
    if evaluation is None:
        return ["No evaluation on record for these weights (run `cxr evaluate`)."]
    if evaluation.weights_sha256 != analysis.weights_sha256:
        return [
            "The evaluation on record is not of these weights (it names "
            f"{evaluation.weights_sha256 or 'no weights'}); none is shown."
        ]
    rows = [
        f"`cxr evaluate` on {evaluation.images} labelled images from {evaluation.source}:",
        "",
        "| finding | n | positives | AUROC [95% CI] |",
        "|---|---:|---:|---|",
    ]
    for f in evaluation.findings:
        lo, hi = f.auroc_ci95
        rows.append(
            f"| {f.finding} | {f.n} | {f.positives} | "
            f"{_number(f.auroc)} [{_number(lo)}, {_number(hi)}] |"
        )
    return rows


def model_card_markdown(
    analysis: ImageAnalysis, device_name: str, evaluation: ModelEvaluation | None
) -> str:
    weights_name = analysis.model_version.split("@", 1)[0]
    lines = [f"# Model card: {device_name}", ""]
    if analysis.untrained:
        lines += [f"{UNTRAINED_HEADLINE}: its scores carry no clinical meaning.", ""]
    lines += [
        f"- Version: `{analysis.model_version}`",
        f"- Weights sha256: `{analysis.weights_sha256 or 'not recorded'}`",
        "",
        "## Intended use",
        "",
        _INTENDED_USE,
        "",
        "## Training data",
        "",
        "None: randomly initialised weights (test and demo mode)."
        if analysis.untrained
        else _TRAINING_DATA.get(weights_name, f"Not recorded for weights `{weights_name}`."),
        "",
        "## Evaluation",
        "",
        *_evaluation_section(analysis, evaluation),
        "",
        "## Limitations",
        "",
        *(f"- {item}" for item in _LIMITATIONS),
    ]
    return "\n".join(lines) + "\n"


def model_card_entry(
    analysis: ImageAnalysis,
    *,
    device_version: str,
    device_urn: str,
    device_name: str,
    evaluation: ModelEvaluation | None,
    t: Terminology,
) -> Resource:
    """A conditional create of the card for this Device and this text."""
    text = model_card_markdown(analysis, device_name, evaluation)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    system, value = t.identifier_system("model_card"), f"{device_version}#{digest}"
    title = f"Model card: {device_version}"
    card: Resource = {
        "resourceType": "DocumentReference",
        "identifier": [{"system": system, "value": value}],
        "status": "current",
        "type": {"text": "AI model card"},
        "subject": ref(device_urn),
        "description": f"{title} — UNTRAINED, NOT FOR CLINICAL USE"
        if analysis.untrained
        else title,
        "content": [
            {
                "attachment": {
                    "contentType": "text/markdown; charset=utf-8",
                    "data": base64.b64encode(text.encode()).decode("ascii"),
                    "title": title,
                }
            }
        ],
    }
    return conditional_create(urn(value, "model-card"), card, identifier_condition(system, value))
