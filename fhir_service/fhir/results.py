"""The one transaction Bundle that records an analysed study: pure functions, dicts in and out.

What is written and why is in the design's ``shared/docs/FHIR_PROFILE.md``; every code comes
from ``codes.json``. The result of one (study, model version, image) is ONE transaction Bundle
(:func:`build_result_transaction`): Device, 14 Observations, heatmap Media for the positive
findings, the DiagnosticReport and a Provenance. Every entry is a conditional create keyed on
an identifier derived from :func:`~fhir_service.fhir.identifiers.report_identifier`, and every
``urn:uuid`` is derived from that key too, so the same inputs give the same bundle byte for
byte (timestamps aside) and posting it again creates nothing: HAPI resolves the placeholders
of matched conditional creates to the resources that already exist.

One concept, one module (over 500 lines on purpose): every entry of that one Bundle is built
here, so the keys and references that tie them together are read in one place.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_service.fhir.datatypes import (
    cc,
    conditional_create,
    identifier_condition,
    instant,
    quantity,
    ref,
    urn,
)
from fhir_service.fhir.derived import DerivedObjects, derived_study_entry, pacs_endpoint_entry
from fhir_service.fhir.identifiers import report_identifier, study_model_identifier
from fhir_service.fhir.model_card import ModelEvaluation, model_card_entry
from fhir_service.fhir.observation_links import (
    SourceImage,
    score_extension,
    source_derived_from,
    source_extensions,
)
from fhir_service.fhir.studies import StudyRef
from fhir_service.fhir.supersede import supersede
from fhir_service.fhir.tasks import task_closure_entry
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology, finding_code
from models.types import NIH_FINDINGS, FindingScore, ImageAnalysis

__all__ = [
    "UNCALIBRATED_NOTE",
    "UNTRAINED_CONCLUSION",
    "UNTRAINED_NOTE",
    "SourceImage",
    "band_text",
    "build_result_transaction",
    "is_cxr_overlay",
    "score_name",
]

#: How many findings the report conclusion names (all positives are always named).
CONCLUSION_TOP_N = 3

UNTRAINED_CONCLUSION = (
    "UNTRAINED MODEL — NOT A FINDING. These numbers come from a model without trained "
    "weights (test/demo mode) and carry no clinical meaning; do not use them for care."
)
UNTRAINED_NOTE = (
    "Untrained model output — not a finding. This number comes from a model without trained "
    "weights (test/demo mode) and carries no clinical meaning."
)
UNCALIBRATED_NOTE = (
    "Uncalibrated score: the model's sigmoid output, not a probability (no calibration was "
    "fitted for these weights and this finding)."
)
_UNTRAINED_TAG = "UNTRAINED MODEL — NOT A FINDING"
_PRELIMINARY_TEXT = "Preliminary AI triage, not reviewed by a radiologist."
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class _Result:
    """What every resource of one result shares."""

    study: StudyRef
    weights_sha256: str
    report_system: str
    report_key: str
    device_urn: str
    issued: str
    untrained: bool
    t: Terminology
    source: SourceImage | None = None

    @property
    def security(self) -> list[dict[str, str]]:
        return [self.t.concept("ai_asserted")]


def build_result_transaction(
    study: Mapping[str, Any],
    analysis: ImageAnalysis,
    heatmaps: Mapping[str, bytes],
    *,
    image_sha256: str,
    recorded: datetime,
    supersedes: Sequence[Mapping[str, Any] | str] = (),
    derived: DerivedObjects | None = None,
    source: SourceImage | None = None,
    evaluation: ModelEvaluation | None = None,
    open_task: Mapping[str, Any] | None = None,
    revision: int = 0,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The one transaction Bundle that records ``analysis`` of ``study``.

    ``heatmaps`` maps each positive finding label to its overlay PNG (extra labels are
    ignored, a missing positive is an error: a positive without its explanation is a bug).
    ``image_sha256`` is the hex sha256 of the analysed pixels and ``recorded`` the time the
    result was made (tz-aware).

    ``supersedes`` names an earlier result of this study that these pixels replace. Resources
    as read from the server (with ``id``: the old report and, best, its Observations and
    Media) are withdrawn in this same transaction (see
    :func:`~fhir_service.fhir.supersede.supersede`), so readers never see two live reports; a
    plain ``"DiagnosticReport/{id}[/_history/{v}]"`` string is only named, and the caller
    withdraws it. Either way each old report becomes a Provenance entity with role
    ``revision``.

    ``derived`` names the SR and heatmap Segmentation stored in the PACS for this result: an
    ImagingStudy listing them (with the PACS Endpoint) joins the transaction and the report's
    ``imagingStudy``. ``source`` names the image read (Media or SOP Instance UID), which each
    Observation identifies (:mod:`~fhir_service.fhir.observation_links`). The Device's model
    card (:mod:`~fhir_service.fhir.model_card`, with ``evaluation`` when one is on record)
    joins the transaction and the Provenance. ``open_task`` is the study's Task as read from
    the server when it waits or has failed: it is completed in this same transaction
    (:func:`~fhir_service.fhir.tasks.task_closure_entry`), so the study is never seen with a
    report and an open Task at once. ``revision``: see
    :func:`~fhir_service.fhir.identifiers.report_identifier`.
    """
    _check_analysis(analysis)
    study_ref = StudyRef.from_resource(study)
    report_system, report_key = report_identifier(
        study_ref.id,
        analysis.model_version,
        image_sha256,
        revision=revision,
        terminology=terminology,
    )
    device_version = _device_version(analysis)
    r = _Result(
        study=study_ref,
        report_system=report_system,
        report_key=report_key,
        # Keyed on the version as displayed, so that a trained and an untrained run of the
        # same weights name can never share (and mislabel) one Device.
        device_urn=urn(device_version, "device"),
        issued=instant(recorded),
        untrained=_is_untrained(analysis),
        t=terminology,
        weights_sha256=analysis.weights_sha256,
        source=source,
    )
    card = model_card_entry(
        analysis,
        device_version=device_version,
        device_urn=r.device_urn,
        device_name=terminology.device_name,
        evaluation=evaluation,
        t=terminology,
    )
    entries = [_device_entry(analysis, device_version, r), card]
    observations = [_observation_entry(f, r) for f in analysis.findings]
    media = _heatmap_entries(analysis, heatmaps, r)
    report = _report_entry(analysis, observations, media, r)
    _link_order(study, [*observations, report])
    if derived is not None:
        entries += _derived_entries(derived, report, r)
    old_reports, withdrawn = _withdrawals(supersedes, r)
    entries += [*observations, *media, report]
    entries.append(_provenance_entry(report, [*observations, *media], old_reports, card, r))
    entries.extend(withdrawn)
    if open_task is not None:
        entries.append(
            task_closure_entry(open_task, report["fullUrl"], now=recorded, terminology=terminology)
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _link_order(study: Mapping[str, Any], entries: Sequence[Resource]) -> None:
    """``basedOn`` the order the study was done for (set by `cxr ingest dicom` from the
    accession number), on each entry's resource."""
    based_on = [
        {"reference": str(b["reference"])}
        for b in study.get("basedOn") or []
        if str(b.get("reference", "")).startswith("ServiceRequest/")
    ]
    for entry in entries if based_on else []:
        entry["resource"]["basedOn"] = based_on


def _derived_entries(derived: DerivedObjects, report: Resource, r: _Result) -> list[Resource]:
    """The PACS Endpoint and an ImagingStudy listing the SR and Segmentation stored there,
    which the report names in ``imagingStudy``."""
    endpoint = pacs_endpoint_entry(derived.endpoint, terminology=r.t)
    study_entry = derived_study_entry(
        derived,
        key=r.report_key,
        subject=r.study.subject,
        source_study=r.study.reference,
        endpoint_url=endpoint["fullUrl"],
        terminology=r.t,
    )
    report["resource"]["imagingStudy"].append(ref(study_entry["fullUrl"]))
    return [endpoint, study_entry]


def is_cxr_overlay(media: Mapping[str, Any], *, terminology: Terminology = TERMINOLOGY) -> bool:
    """True for a heatmap Media written by cxr-fhir.

    Overlays share ``partOf`` → ImagingStudy with the input image Media, so the pixel lookup
    must skip them or a re-run would analyse its own heatmap.
    """
    system = terminology.identifier_system("heatmap")
    return any(i.get("system") == system for i in media.get("identifier", []))


# --- checks and wording ------------------------------------------------------------------------


def _check_analysis(analysis: ImageAnalysis) -> None:
    labels = tuple(f.finding for f in analysis.findings)
    if labels != NIH_FINDINGS:
        raise ValueError(f"analysis findings {labels} are not NIH_FINDINGS in order")
    for f in analysis.findings:
        numbers = (f.calibrated_probability, f.band_low, f.band_high, f.threshold, f.sigmoid_score)
        if not all(0.0 <= float(x) <= 1.0 for x in numbers):
            raise ValueError(f"{f.finding}: probabilities must lie in [0, 1]: {f}")
        if not f.band_low <= f.band_high:
            raise ValueError(f"{f.finding}: band_low {f.band_low} > band_high {f.band_high}")
        if float(f.logit) != float(f.logit) or abs(float(f.logit)) == float("inf"):
            # JSON has no NaN/Infinity; HAPI would reject the whole bundle with a parse error.
            raise ValueError(f"{f.finding}: logit is not finite: {f.logit}")


def _is_untrained(analysis: ImageAnalysis) -> bool:
    # Either signal suffices: presenting untrained output as a finding is the one error
    # that must never happen, so a contradictory pair errs on the side of "untrained".
    return analysis.untrained or "untrained" in analysis.model_version.lower()


def _device_version(analysis: ImageAnalysis) -> str:
    version = analysis.model_version
    if _is_untrained(analysis) and "untrained" not in version.lower():
        version += " (untrained)"
    return version


def _png_size(png: bytes) -> tuple[int, int]:
    if len(png) < 24 or not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("heatmap is not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _fmt(p: float) -> str:
    return f"{float(p):.3f}"


def _fmt_threshold(t: float) -> str:
    """Four significant digits: torchxrayvision's operating points go down to 0.00044."""
    return f"{float(t):.4g}"


def score_name(f: FindingScore) -> str:
    """What the Observation's value is: never "probability" unless a calibration was fitted."""
    return "calibrated probability" if f.calibrated else "uncalibrated score"


def band_text(f: FindingScore) -> str:
    """The band named for what it is; '' when none was computed."""
    span = f"{_fmt(f.band_low)}–{_fmt(f.band_high)}"
    if f.band_kind == "tta-spread":
        return f"spread over augmented views {span}"
    if f.band_kind in ("calibration", "calibration+tta"):
        return f"95 % band {span}"
    return ""


def _conclusion(analysis: ImageAnalysis, untrained: bool, terminology: Terminology) -> str:
    ranked = sorted(analysis.findings, key=lambda f: (-f.calibrated_probability, f.finding))
    positives = [f for f in ranked if f.positive]
    named = (
        positives
        + [f for f in ranked if not f.positive][: max(0, CONCLUSION_TOP_N - len(positives))]
    )
    parts = []
    for f in named:
        details = [x for x in (band_text(f),) if x]
        details.append(
            f"{'above' if f.positive else 'below'} threshold {_fmt_threshold(f.threshold)}"
        )
        parts.append(
            f"{terminology.findings[f.finding].text} {score_name(f)} "
            f"{_fmt(f.calibrated_probability)} ({', '.join(details)})"
        )
    if positives:
        head = f"{len(positives)} finding(s) at or above the operating threshold."
    else:
        head = "No finding at or above its operating threshold."
    text = f"{_PRELIMINARY_TEXT} {head} Top findings: {'; '.join(parts)}."
    return f"{UNTRAINED_CONCLUSION} {text}" if untrained else text


# --- one entry per resource family ---------------------------------------------------------------


def _device_entry(analysis: ImageAnalysis, device_version: str, r: _Result) -> Resource:
    t = r.t
    device: Resource = {
        "resourceType": "Device",
        "identifier": [{"system": t.identifier_system("device"), "value": device_version}],
        "status": "active",
        "manufacturer": t.device_manufacturer,
        "deviceName": [
            {"name": t.device_name, "type": "user-friendly-name"},
            {"name": analysis.model_version, "type": "model-name"},
        ],
        "type": cc(t.concept("ai_device_type")),
        "version": [{"value": device_version}],
    }
    if analysis.weights_sha256:
        device["version"].append(
            {"type": {"text": _weights_hash_label(r)}, "value": analysis.weights_sha256}
        )
    if r.untrained:
        device["note"] = [{"text": UNTRAINED_CONCLUSION}]
    condition = identifier_condition(t.identifier_system("device"), device_version)
    return conditional_create(r.device_urn, device, condition)


def _observation_entry(f: FindingScore, r: _Result) -> Resource:
    t = r.t
    slug = t.findings[f.finding].slug
    system, value = t.identifier_system("observation"), f"{r.report_key}.{slug}"
    interp = t.concept("interpretation_positive" if f.positive else "interpretation_negative")
    relation = "≥" if f.positive else "<"
    obs: Resource = {"resourceType": "Observation", "meta": {"security": r.security}}
    extensions = [score_extension(f, untrained=r.untrained, t=t)]
    if f.has_band:
        # A Range only where a band was computed; the augmented-view spread is not a
        # confidence interval, so it has its own extension, never AIconfidence.
        name = "tta_spread" if f.band_kind == "tta-spread" else "ai_confidence"
        band = {"low": quantity(f.band_low, t), "high": quantity(f.band_high, t)}
        extensions.append({"url": t.extension_url(name), "valueRange": band})
    obs["extension"] = extensions + source_extensions(r.source, t)
    obs.update(
        {
            "identifier": [{"system": system, "value": value}],
            "status": "preliminary",
            "category": [cc(t.concept("observation_category"))],
            "code": finding_code(f.finding, terminology=t),
            "subject": ref(r.study.subject),
        }
    )
    if r.study.started:
        obs["effectiveDateTime"] = r.study.started
    interpretation = (
        f"{score_name(f)} {_fmt(f.calibrated_probability)} {relation} "
        f"operating threshold {_fmt_threshold(f.threshold)}"
    )
    obs.update(
        {
            "issued": r.issued,
            "valueQuantity": quantity(f.calibrated_probability, t),
            "interpretation": [cc(interp, interpretation)],
            "bodySite": cc(t.concept("body_site_lung")),
            "device": ref(r.device_urn),
            "derivedFrom": [ref(r.study.reference), *source_derived_from(r.source)],
            # Raw model numbers stay beside the value for audit; as components
            # with their own codes they can never be mistaken for the Observation's value.
            "component": [
                {"code": cc(t.concept(name)), "valueQuantity": quantity(x, t)}
                for name, x in (
                    ("component_logit", f.logit),
                    ("component_sigmoid_score", f.sigmoid_score),
                    ("component_threshold", f.threshold),
                )
            ],
        }
    )
    notes = [UNTRAINED_NOTE] if r.untrained else []
    if not f.calibrated:
        notes.append(UNCALIBRATED_NOTE)
    if notes:
        obs["note"] = [{"text": n} for n in notes]
    return conditional_create(
        urn(r.report_key, f"observation/{slug}"), obs, identifier_condition(system, value)
    )


def _heatmap_entries(
    analysis: ImageAnalysis, heatmaps: Mapping[str, bytes], r: _Result
) -> list[Resource]:
    positives = [f for f in analysis.findings if f.positive]
    missing = [f.finding for f in positives if f.finding not in heatmaps]
    if missing:
        raise ValueError(f"no heatmap for positive finding(s): {', '.join(missing)}")
    return [_heatmap_entry(f, heatmaps[f.finding], r) for f in positives]


def _heatmap_title(f: FindingScore, r: _Result) -> str:
    title = f"Heatmap (class activation map): {r.t.findings[f.finding].text}"
    return f"{title} — {_UNTRAINED_TAG}" if r.untrained else title


def _heatmap_entry(f: FindingScore, png: bytes, r: _Result) -> Resource:
    t = r.t
    fc = t.findings[f.finding]
    width, height = _png_size(png)
    system, value = t.identifier_system("heatmap"), f"{r.report_key}.{fc.slug}"
    note = (
        f"Where the model looked for {fc.text} "
        f"({score_name(f)} {_fmt(f.calibrated_probability)}); "
        "an explanation of the score, not a segmentation."
    )
    media: Resource = {
        "resourceType": "Media",
        "meta": {"security": r.security},
        "identifier": [{"system": system, "value": value}],
        "status": "completed",
        "type": cc(t.concept("media_type_image")),
        "partOf": [ref(r.study.reference)],
        "subject": ref(r.study.subject),
        "createdDateTime": r.issued,
        "issued": r.issued,
        "device": ref(r.device_urn),
        # The finding this overlay explains: the one structured link from image to finding.
        "reasonCode": [finding_code(f.finding, terminology=t)],
        "bodySite": cc(t.concept("body_site_lung")),
        "height": height,
        "width": width,
        "content": {
            "contentType": "image/png",
            "data": base64.b64encode(png).decode("ascii"),
            "title": _heatmap_title(f, r),
        },
        "note": [{"text": note + (f" {UNTRAINED_NOTE}" if r.untrained else "")}],
    }
    return conditional_create(
        urn(r.report_key, f"media/{fc.slug}"), media, identifier_condition(system, value)
    )


def _report_entry(
    analysis: ImageAnalysis, observations: list[Resource], media: list[Resource], r: _Result
) -> Resource:
    t = r.t
    sm_system, sm_value = study_model_identifier(r.study.id, analysis.model_version, terminology=t)
    report: Resource = {
        "resourceType": "DiagnosticReport",
        "meta": {"security": r.security},
        "identifier": [
            {"system": r.report_system, "value": r.report_key},
            {"system": sm_system, "value": sm_value},
        ],
        "status": "preliminary",
        "category": [cc(t.concept("report_category"))],
        "code": cc(t.concept("report_code")),
        "subject": ref(r.study.subject),
    }
    if r.study.started:
        report["effectiveDateTime"] = r.study.started
    report.update(
        {
            "issued": r.issued,
            "imagingStudy": [ref(r.study.reference)],
            "result": [ref(e["fullUrl"]) for e in observations],
        }
    )
    if media:
        report["media"] = [
            {"comment": e["resource"]["content"]["title"], "link": ref(e["fullUrl"])} for e in media
        ]
    report["conclusion"] = _conclusion(analysis, r.untrained, t)
    positives = [f for f in analysis.findings if f.positive]
    if positives:
        report["conclusionCode"] = [finding_code(f.finding, terminology=t) for f in positives]
    condition = identifier_condition(r.report_system, r.report_key)
    return conditional_create(urn(r.report_key, "report"), report, condition)


def _withdrawals(
    supersedes: Sequence[Mapping[str, Any] | str], r: _Result
) -> tuple[list[str], list[Resource]]:
    """References of the old reports, and the PUT entries that withdraw what was read."""
    old_reports: list[str] = []
    entries: list[Resource] = []
    for old in supersedes:
        if isinstance(old, str):
            if not old.startswith("DiagnosticReport/"):
                raise ValueError(f"supersedes takes DiagnosticReport references, got {old!r}")
            old_reports.append(old)
            continue
        if not old.get("id"):
            raise ValueError("superseded resources must be read from the server (need an id)")
        kind, oid = old["resourceType"], old["id"]
        if kind == "DiagnosticReport":
            version = (old.get("meta") or {}).get("versionId")
            old_reports.append(f"{kind}/{oid}" + (f"/_history/{version}" if version else ""))
        # A plain PUT, not If-Match: re-running the transaction then writes an unchanged
        # resource, which HAPI stores as no new version.
        # R4 validation wants a fullUrl on every entry; a placeholder keeps the bundle free of
        # the server's address (and reproducible), and nothing in the bundle refers to it.
        entries.append(
            {
                "fullUrl": urn(r.report_key, f"superseded/{kind}/{oid}"),
                "resource": supersede(old),
                "request": {"method": "PUT", "url": f"{kind}/{oid}"},
            }
        )
    return old_reports, entries


def _weights_hash_label(r: _Result) -> str:
    if r.untrained:
        return "sha256 of the untrained model's parameters (no weights file)"
    return "sha256 of the loaded weights file"


def _source_media_entity(r: _Result) -> list[Resource]:
    media = r.source.versioned_media if r.source is not None else None
    return [{"role": "source", "what": ref(media)}] if media else []


def _weights_entity(r: _Result) -> list[Resource]:
    """The weights file that made the result, by its sha256 (a logical reference)."""
    if not r.weights_sha256:
        return []
    what = {
        "identifier": {
            "system": r.t.identifier_system("weights_sha256"),
            "value": r.weights_sha256,
        },
        "display": _weights_hash_label(r),
    }
    return [{"role": "source", "what": what}]


def _provenance_entry(
    report: Resource, targets: list[Resource], old_reports: list[str], card: Resource, r: _Result
) -> Resource:
    t = r.t
    provenance: Resource = {
        "resourceType": "Provenance",
        "target": [ref(report["fullUrl"]), *(ref(e["fullUrl"]) for e in targets)],
        "recorded": r.issued,
        "reason": [cc(t.concept("ai_asserted"))],
        "activity": cc(t.concept("provenance_activity_create")),
        "agent": [{"type": cc(t.concept("provenance_agent_author")), "who": ref(r.device_urn)}],
        "entity": [{"role": "source", "what": ref(r.study.versioned_reference)}]
        # The input image as read (the Media path): with the study's version, it tells a
        # later job whether anything it would read has changed since this result.
        + _source_media_entity(r)
        + _weights_entity(r)
        # R4 DiagnosticReport has no relatesTo; Provenance.entity role "revision" is R4's way
        # to say "the target is a revised version of this": the new report revises the old.
        + [{"role": "revision", "what": ref(old)} for old in old_reports]
        # The model card documents the algorithm that made the result (R4 Device has no
        # element for it; the card's subject is the Device).
        + [{"role": "source", "what": {**ref(card["fullUrl"]), "display": "model card"}}],
    }
    # Provenance has no identifier in R4: key it on its target. HAPI substitutes the report's
    # placeholder in the condition with the report's real id (new or matched).
    return conditional_create(
        urn(r.report_key, "provenance"), provenance, f"target={report['fullUrl']}"
    )
