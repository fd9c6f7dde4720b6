"""Radiologists' decisions read back from FHIR, as labels for the model's own logits.

``cxr calibrate --from-feedback`` learns per-site operating thresholds from the reviews the
app writes (:mod:`fhir_service.fhir.review`). One search gathers everything::

    Observation?identifier={review system}|
        &_include=Observation:derived-from        (the AI Observation reviewed)
        &_include:iterate=Observation:device      (the Device: which model version)

:func:`decisions_from` turns those resources into one :class:`Decision` per reviewed AI
Observation of the wanted model: the radiologist's label (the reviewer's interpretation POS
→ 1, NEG → 0; "uncertain" (IND) is no label), the raw logit the Observation carries as a
component (so a refit does not depend on the calibration in force when it was written), and
the threshold and value the AI used. When several reviewers decided, the latest review counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_service.fhir.review import is_review_observation
from fhir_service.fhir.terminology import TERMINOLOGY, Terminology

__all__ = ["Decision", "FeedbackSet", "decisions_from", "feedback_search_params"]


@dataclass(frozen=True)
class Decision:
    finding: str
    """NIH label"""
    label: int
    """the radiologist's: 1 present, 0 absent"""
    logit: float
    ai_value: float
    """the Observation's value (calibrated probability or score) when the AI decided"""
    ai_threshold: float
    observation_id: str
    reviewer: str
    recorded: str


@dataclass
class FeedbackSet:
    decisions: list[Decision] = field(default_factory=list)
    #: reviews not used, by reason (other model version, uncertain, no logit, …)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def feedback_search_params(*, terminology: Terminology = TERMINOLOGY) -> dict[str, str]:
    """The search (on ``Observation``) that returns reviews, their AI Observations and Devices."""
    return {
        "identifier": f"{terminology.identifier_system('review')}|",
        "_include": "Observation:derived-from",
        "_include:iterate": "Observation:device",
        "_count": "200",
    }


def _ref_id(reference: Mapping[str, Any] | None, rtype: str) -> str | None:
    parts = str((reference or {}).get("reference", "")).split("/")
    for i in range(len(parts) - 1):
        if parts[i] == rtype and parts[i + 1]:
            return parts[i + 1]
    return None


def _interpretation(obs: Mapping[str, Any]) -> str | None:
    for concept in obs.get("interpretation", []):
        for coding in concept.get("coding", []):
            if coding.get("code") in ("POS", "NEG", "IND"):
                return str(coding["code"])
    return None


def _component(obs: Mapping[str, Any], concept: Mapping[str, str]) -> float | None:
    for comp in obs.get("component", []):
        for coding in (comp.get("code") or {}).get("coding", []):
            if coding.get("system") == concept["system"] and coding.get("code") == concept["code"]:
                value = (comp.get("valueQuantity") or {}).get("value")
                return float(value) if value is not None else None
    return None


def _finding(obs: Mapping[str, Any], t: Terminology) -> str | None:
    system = t.code_system_url("nih_label")
    for coding in (obs.get("code") or {}).get("coding", []):
        if coding.get("system") == system:
            return str(coding.get("code"))
    return None


def _device_version(device: Mapping[str, Any] | None) -> str | None:
    for version in (device or {}).get("version", []):
        if version.get("value"):
            return str(version["value"])
    return None


def model_matches(device_version: str | None, weights_version: str) -> bool:
    """A Device of these weights: its version is the weights' model version, with or without
    a calibration suffix (``+cal…``) or the untrained marker."""
    if not device_version:
        return False
    head = device_version.split(" (untrained)")[0]
    return head == weights_version or head.startswith(weights_version + "+")


def decisions_from(
    resources: Iterable[Mapping[str, Any]],
    *,
    weights_version: str,
    terminology: Terminology = TERMINOLOGY,
) -> FeedbackSet:
    """The labelled decisions on AI Observations of ``weights_version`` among ``resources``."""
    t = terminology
    by_key = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources}
    reviews = [r for r in by_key.values() if is_review_observation(r, terminology=t)]
    reviews.sort(key=lambda r: str(r.get("issued", "")))
    latest: dict[str, Mapping[str, Any]] = {}
    for review in reviews:  # oldest first: the last one per AI Observation wins
        target = next(
            (o for d in review.get("derivedFrom", []) if (o := _ref_id(d, "Observation"))), None
        )
        if target is not None:
            latest[target] = review
    out = FeedbackSet()
    logit_concept = t.concept("component_logit")
    threshold_concept = t.concept("component_threshold")
    for target, review in latest.items():
        ai = by_key.get(f"Observation/{target}")
        if ai is None:
            out.skip("AI Observation not found")
            continue
        device = by_key.get(f"Device/{_ref_id(ai.get('device'), 'Device')}")
        if not model_matches(_device_version(device), weights_version):
            out.skip("another model version")
            continue
        human = _interpretation(review)
        if human not in ("POS", "NEG"):
            out.skip("uncertain (no label)")
            continue
        finding = _finding(ai, t)
        logit = _component(ai, logit_concept)
        threshold = _component(ai, threshold_concept)
        value = (ai.get("valueQuantity") or {}).get("value")
        if finding is None or logit is None or threshold is None or value is None:
            out.skip("AI Observation without finding, logit, threshold or value")
            continue
        out.decisions.append(
            Decision(
                finding=finding,
                label=1 if human == "POS" else 0,
                logit=logit,
                ai_value=float(value),
                ai_threshold=threshold,
                observation_id=target,
                reviewer=str(((review.get("performer") or [{}])[0]).get("reference", "")),
                recorded=str(review.get("issued", "")),
            )
        )
    return out
