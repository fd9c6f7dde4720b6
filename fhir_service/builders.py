"""FHIR R4 resources for one analysed study: pure functions, plain dicts in and out, no HTTP.

What is written and why is in ``docs/FHIR_PROFILE.md``; every code comes from
``codes.json`` (loaded once into :data:`TERMINOLOGY`), so a terminology review edits one file.

The result of one (study, model version, image) is ONE transaction Bundle
(:func:`build_result_transaction`): Device, 14 Observations, heatmap Media for the positive
findings, the DiagnosticReport and a Provenance. Every entry is a conditional create keyed on
an identifier derived from :func:`report_identifier`, and every ``urn:uuid`` is derived from
that key too, so the same inputs give the same bundle byte for byte (timestamps aside) and
posting it again creates nothing: HAPI resolves the placeholders of matched conditional
creates to the resources that already exist.

A study that cannot be analysed gets one Task (:func:`build_failed_task`), updated in place on
retry through a conditional update on :func:`task_identifier`, and completed
(:func:`build_completed_task`) when a later run succeeds. A report whose study image changed
is withdrawn with :func:`supersede_report` and linked from its successor's Provenance.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from importlib import resources
from typing import Any
from urllib.parse import quote

from models.types import NIH_FINDINGS, FindingScore, ImageAnalysis

__all__ = [
    "TERMINOLOGY",
    "UNTRAINED_CONCLUSION",
    "UNTRAINED_NOTE",
    "FindingCode",
    "Resource",
    "StudyRef",
    "Terminology",
    "build_completed_task",
    "build_failed_task",
    "build_result_transaction",
    "finding_code",
    "is_cxr_overlay",
    "load_terminology",
    "local_code_systems",
    "report_identifier",
    "study_model_identifier",
    "supersede",
    "supersede_report",
    "task_conditional_url",
    "task_identifier",
    "token_search_value",
]

Resource = dict[str, Any]
Coding = dict[str, str]

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
_UNTRAINED_TAG = "UNTRAINED MODEL — NOT A FINDING"
_PRELIMINARY_TEXT = "Preliminary AI triage, not reviewed by a radiologist."

# uuid5 namespace of cxr-fhir's bundle placeholders; never change it, or re-runs of old
# inputs would produce different (though still idempotent) bundles.
_UUID_NAMESPACE = uuid.UUID("1f0c6d2e-4b7a-5e3c-9a1d-8c2b5f4e7a90")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_BUSINESS_CODE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DECIMALS = 4


# --- terminology (codes.json) --------------------------------------------------------------


@dataclass(frozen=True)
class FindingCode:
    """The codes of one NIH finding, as ``codes.json`` lists them."""

    label: str
    """the NIH ChestX-ray14 label, exactly as ``NIH_FINDINGS`` spells it"""
    text: str
    """what a clinician reads (``CodeableConcept.text``)"""
    codings: tuple[Coding, ...]
    """standard codings (SNOMED CT, DICOM, RadLex) in the order they are written"""
    verify: tuple[str, ...]
    """open terminology-review items for this finding ("system|code: reason")"""
    note: str | None

    @property
    def slug(self) -> str:
        return self.label.lower().replace("_", "-")


@dataclass(frozen=True)
class Terminology:
    """``codes.json``, checked on load. Raw dict access stays inside this class."""

    data: Mapping[str, Any]

    def concept(self, name: str) -> Coding:
        return _clean_coding(self.data["concepts"][name])

    def identifier_system(self, name: str) -> str:
        return str(self.data["identifier_systems"][name])

    def code_system_url(self, name: str) -> str:
        return str(self.data["code_systems"][name]["url"])

    def extension_url(self, name: str) -> str:
        return str(self.data["extensions"][name])

    @property
    def device_name(self) -> str:
        return str(self.data["device"]["name"])

    @property
    def device_manufacturer(self) -> str:
        return str(self.data["device"]["manufacturer"])

    @cached_property
    def findings(self) -> Mapping[str, FindingCode]:
        out: dict[str, FindingCode] = {}
        for item in self.data["findings"]:
            codings = tuple(_clean_coding(c) for c in item["codings"])
            verify = tuple(
                f"{c['system']}|{c['code']}: {c['verify']}"
                for c in item["codings"]
                if "verify" in c
            )
            out[item["label"]] = FindingCode(
                label=item["label"],
                text=item["text"],
                codings=codings,
                verify=verify,
                note=item.get("note"),
            )
        return out


def _clean_coding(raw: Mapping[str, Any]) -> Coding:
    # "verify" is review bookkeeping and a null display means "write none": neither is FHIR.
    return {k: str(raw[k]) for k in ("system", "code", "display") if raw.get(k) is not None}


def load_terminology(text: str | None = None) -> Terminology:
    """Parse ``codes.json`` (or ``text``) and check that it covers exactly the 14 findings."""
    if text is None:
        text = resources.files("fhir_service").joinpath("codes.json").read_text("utf-8")
    term = Terminology(json.loads(text))
    labels = tuple(term.findings)
    if labels != NIH_FINDINGS:
        raise ValueError(f"codes.json findings {labels} differ from NIH_FINDINGS {NIH_FINDINGS}")
    for name in term.data["concepts"]:
        coding = term.concept(name)
        if not coding.get("system") or not coding.get("code"):
            raise ValueError(f"codes.json concept {name!r} lacks system or code")
    return term


TERMINOLOGY = load_terminology()


def finding_code(label: str, *, terminology: Terminology = TERMINOLOGY) -> Resource:
    """The CodeableConcept of one finding: standard codings, then the NIH label coding."""
    fc = terminology.findings[label]
    nih = {"system": terminology.code_system_url("nih_label"), "code": fc.label}
    return {"coding": [*map(dict, fc.codings), nih], "text": fc.text}


def local_code_systems(*, terminology: Terminology = TERMINOLOGY) -> list[Resource]:
    """CodeSystem resources for our local, closed code systems (NIH labels, model outputs).

    Loading them into the FHIR server (or HAPI's extra validation definitions) lets the
    validator check our local codes instead of warning that the systems are unknown.
    """
    concepts = terminology.data["concepts"]
    model_output = [
        {"code": c["code"], "display": c["display"]}
        for c in concepts.values()
        if c["system"] == terminology.code_system_url("model_output")
    ]
    nih = [{"code": f.label, "display": f.text} for f in terminology.findings.values()]
    out = []
    for key, members in (("nih_label", nih), ("model_output", model_output)):
        meta = terminology.data["code_systems"][key]
        out.append(
            {
                "resourceType": "CodeSystem",
                "id": key.replace("_", "-"),
                "url": meta["url"],
                "name": meta["name"],
                "title": meta["title"],
                "status": "active",
                "experimental": False,
                "description": meta["description"],
                "caseSensitive": True,
                "content": "complete",
                "count": len(members),
                "concept": members,
            }
        )
    return out


# --- keys and references ---------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRef:
    """What the builders need from an ImagingStudy resource."""

    id: str
    version_id: str | None
    subject: str
    started: str | None = None

    @classmethod
    def from_resource(cls, study: Mapping[str, Any]) -> StudyRef:
        if study.get("resourceType", "ImagingStudy") != "ImagingStudy":
            raise ValueError(f"expected an ImagingStudy, got {study.get('resourceType')}")
        sid = study.get("id")
        subject = (study.get("subject") or {}).get("reference")
        if not sid or not subject:
            raise ValueError("the ImagingStudy needs an id and a subject reference")
        version = (study.get("meta") or {}).get("versionId")
        return cls(
            id=str(sid),
            version_id=str(version) if version else None,
            subject=str(subject),
            started=study.get("started"),
        )

    @property
    def reference(self) -> str:
        return f"ImagingStudy/{self.id}"

    @property
    def versioned_reference(self) -> str:
        # Provenance records which version was read; everything else stays unversioned so
        # that ordinary searches (derived-from, imagingStudy, focus) match.
        if self.version_id is None:
            return self.reference
        return f"{self.reference}/_history/{self.version_id}"


def _digest(*parts: str) -> str:
    # The unit separator cannot occur in ids, versions or hex digests, so the join is unambiguous.
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def report_identifier(
    study_id: str, model_version: str, image_sha256: str, *, terminology: Terminology = TERMINOLOGY
) -> tuple[str, str]:
    """(system, value) of the report for these pixels of this study by this model.

    The idempotency key of the whole result: the value is the sha256 of the three parts, so it
    is a plain token (no escaping in searches) of fixed length whatever the model version holds.
    """
    if not _SHA256_HEX.match(image_sha256):
        raise ValueError(f"image_sha256 must be 64 lowercase hex digits, got {image_sha256!r}")
    value = _digest("report", study_id, model_version, image_sha256)
    return terminology.identifier_system("report"), value


def study_model_identifier(
    study_id: str, model_version: str, *, terminology: Terminology = TERMINOLOGY
) -> tuple[str, str]:
    """(system, value) shared by every report of this study by this model, whatever the pixels.

    Lets the reconciliation sweep ask "does this study have a report for the current model?"
    without fetching and hashing the pixels.
    """
    value = _digest("study-model", study_id, model_version)
    return terminology.identifier_system("report_study_model"), value


def task_identifier(study_id: str, *, terminology: Terminology = TERMINOLOGY) -> tuple[str, str]:
    """(system, value) of the one analysis Task of a study: keyed on the study alone, so a
    retry (with any model version) updates that Task instead of adding one."""
    return terminology.identifier_system("task"), study_id


def token_search_value(system: str, value: str) -> str:
    """``system|value`` for a token search parameter, escaped and percent-encoded.

    FHIR search escapes ``\\ | , $`` with a backslash; HAPI url-decodes ``ifNoneExist`` and
    conditional URLs, so a ``+`` left raw would come back as a space.
    """
    escaped = re.sub(r"([\\|,$])", r"\\\1", value)
    return f"{quote(system, safe=':/')}|{quote(escaped, safe='')}"


def task_conditional_url(study_id: str, *, terminology: Terminology = TERMINOLOGY) -> str:
    """The conditional-update URL of a study's Task: ``PUT Task?identifier=...``."""
    return "Task?identifier=" + token_search_value(
        *task_identifier(study_id, terminology=terminology)
    )


def _urn(key: str, role: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{key}/{role}')}"


def _instant(ts: datetime) -> str:
    if ts.tzinfo is None or ts.utcoffset() is None:
        # FHIR instant requires a zone; a naive datetime would be read as server local time.
        raise ValueError("timestamps must be timezone-aware")
    return ts.isoformat(timespec="milliseconds")


def _cc(coding: Coding, text: str | None = None) -> Resource:
    out: Resource = {"coding": [dict(coding)]}
    if text:
        out["text"] = text
    return out


def _ref(reference: str, display: str | None = None) -> Resource:
    return {"reference": reference, **({"display": display} if display else {})}


def _num(x: float) -> float:
    return round(float(x), _DECIMALS)


def _quantity(x: float, terminology: Terminology) -> Resource:
    # UCUM "1": probabilities and logits are dimensionless.
    unit = terminology.concept("unit_one")
    return {"value": _num(x), "system": unit["system"], "code": unit["code"]}


def _entry(urn: str, resource: Resource, if_none_exist: str) -> Resource:
    return {
        "fullUrl": urn,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": if_none_exist,
        },
    }


def _identifier_entry_condition(system: str, value: str) -> str:
    return "identifier=" + token_search_value(system, value)


# --- the result transaction ------------------------------------------------------------------


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
    return f"{float(p):.2f}"


def _conclusion(analysis: ImageAnalysis, untrained: bool, terminology: Terminology) -> str:
    ranked = sorted(analysis.findings, key=lambda f: (-f.calibrated_probability, f.finding))
    positives = [f for f in ranked if f.positive]
    named = (
        positives
        + [f for f in ranked if not f.positive][: max(0, CONCLUSION_TOP_N - len(positives))]
    )
    parts = [
        f"{terminology.findings[f.finding].text} {_fmt(f.calibrated_probability)} "
        f"(band {_fmt(f.band_low)}–{_fmt(f.band_high)}, "
        f"{'above' if f.positive else 'below'} threshold {_fmt(f.threshold)})"
        for f in named
    ]
    if positives:
        head = f"{len(positives)} finding(s) at or above the operating threshold."
    else:
        head = "No finding at or above its operating threshold."
    text = f"{_PRELIMINARY_TEXT} {head} Top findings by calibrated probability: {'; '.join(parts)}."
    return f"{UNTRAINED_CONCLUSION} {text}" if untrained else text


def _observation(
    f: FindingScore,
    *,
    study: StudyRef,
    identifier: tuple[str, str],
    device_urn: str,
    issued: str,
    untrained: bool,
    terminology: Terminology,
) -> Resource:
    t = terminology
    interp = t.concept("interpretation_positive" if f.positive else "interpretation_negative")
    relation = "≥" if f.positive else "<"
    obs: Resource = {
        "resourceType": "Observation",
        "meta": {"security": [t.concept("ai_asserted")]},
        "extension": [
            {
                "url": t.extension_url("ai_confidence"),
                "valueRange": {
                    "low": _quantity(f.band_low, t),
                    "high": _quantity(f.band_high, t),
                },
            }
        ],
        "identifier": [{"system": identifier[0], "value": identifier[1]}],
        "status": "preliminary",
        "category": [_cc(t.concept("observation_category"))],
        "code": finding_code(f.finding, terminology=t),
        "subject": _ref(study.subject),
    }
    if study.started:
        obs["effectiveDateTime"] = study.started
    obs.update(
        {
            "issued": issued,
            "valueQuantity": _quantity(f.calibrated_probability, t),
            "interpretation": [
                _cc(
                    interp,
                    f"calibrated probability {_fmt(f.calibrated_probability)} {relation} "
                    f"operating threshold {_fmt(f.threshold)}",
                )
            ],
            "bodySite": _cc(t.concept("body_site_lung")),
            "device": _ref(device_urn),
            "derivedFrom": [_ref(study.reference)],
            # Raw model numbers stay beside the calibrated value for audit; as components
            # with their own codes they can never be mistaken for the Observation's value.
            "component": [
                {"code": _cc(t.concept("component_logit")), "valueQuantity": _quantity(f.logit, t)},
                {
                    "code": _cc(t.concept("component_sigmoid_score")),
                    "valueQuantity": _quantity(f.sigmoid_score, t),
                },
                {
                    "code": _cc(t.concept("component_threshold")),
                    "valueQuantity": _quantity(f.threshold, t),
                },
            ],
        }
    )
    if untrained:
        obs["note"] = [{"text": UNTRAINED_NOTE}]
    return obs


def build_result_transaction(
    study: Mapping[str, Any],
    analysis: ImageAnalysis,
    heatmaps: Mapping[str, bytes],
    *,
    image_sha256: str,
    recorded: datetime,
    supersedes: Sequence[Mapping[str, Any] | str] = (),
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The one transaction Bundle that records ``analysis`` of ``study``.

    ``heatmaps`` maps each positive finding label to its overlay PNG (extra labels are
    ignored, a missing positive is an error: a positive without its explanation is a bug).
    ``image_sha256`` is the hex sha256 of the analysed pixels and ``recorded`` the time the
    result was made (tz-aware).

    ``supersedes`` names an earlier result of this study that these pixels replace. Resources
    as read from the server (with ``id``: the old report and, best, its Observations and
    Media) are withdrawn in this same transaction (see :func:`supersede`), so readers never
    see two live reports; a plain ``"DiagnosticReport/{id}[/_history/{v}]"`` string is only
    named, and the caller withdraws it. Either way each old report becomes a Provenance
    entity with role ``revision``.
    """
    t = terminology
    _check_analysis(analysis)
    ref = StudyRef.from_resource(study)
    untrained = _is_untrained(analysis)
    issued = _instant(recorded)
    report_sys, report_key = report_identifier(
        ref.id, analysis.model_version, image_sha256, terminology=t
    )
    security = [t.concept("ai_asserted")]

    # Keyed on the version as displayed, so that a trained and an untrained run of the same
    # weights name can never share (and mislabel) one Device.
    device_version = _device_version(analysis)
    device_urn = _urn(device_version, "device")
    device: Resource = {
        "resourceType": "Device",
        "identifier": [{"system": t.identifier_system("device"), "value": device_version}],
        "status": "active",
        "manufacturer": t.device_manufacturer,
        "deviceName": [
            {"name": t.device_name, "type": "user-friendly-name"},
            {"name": analysis.model_version, "type": "model-name"},
        ],
        "type": _cc(t.concept("ai_device_type")),
        "version": [{"value": device_version}],
    }
    if untrained:
        device["note"] = [{"text": UNTRAINED_CONCLUSION}]
    entries = [
        _entry(
            device_urn,
            device,
            _identifier_entry_condition(t.identifier_system("device"), device_version),
        )
    ]

    obs_refs: list[str] = []
    for f in analysis.findings:
        fc = t.findings[f.finding]
        urn = _urn(report_key, f"observation/{fc.slug}")
        identifier = (t.identifier_system("observation"), f"{report_key}.{fc.slug}")
        obs = _observation(
            f,
            study=ref,
            identifier=identifier,
            device_urn=device_urn,
            issued=issued,
            untrained=untrained,
            terminology=t,
        )
        entries.append(_entry(urn, obs, _identifier_entry_condition(*identifier)))
        obs_refs.append(urn)

    media_links: list[Resource] = []
    positives = [f for f in analysis.findings if f.positive]
    missing = [f.finding for f in positives if f.finding not in heatmaps]
    if missing:
        raise ValueError(f"no heatmap for positive finding(s): {', '.join(missing)}")
    for f in positives:
        fc = t.findings[f.finding]
        png = heatmaps[f.finding]
        width, height = _png_size(png)
        title = f"Heatmap (class activation map): {fc.text}"
        if untrained:
            title += f" — {_UNTRAINED_TAG}"
        urn = _urn(report_key, f"media/{fc.slug}")
        identifier = (t.identifier_system("heatmap"), f"{report_key}.{fc.slug}")
        media: Resource = {
            "resourceType": "Media",
            "meta": {"security": security},
            "identifier": [{"system": identifier[0], "value": identifier[1]}],
            "status": "completed",
            "type": _cc(t.concept("media_type_image")),
            "partOf": [_ref(ref.reference)],
            "subject": _ref(ref.subject),
            "createdDateTime": issued,
            "issued": issued,
            "device": _ref(device_urn),
            # The finding this overlay explains: the one structured link from image to finding.
            "reasonCode": [finding_code(f.finding, terminology=t)],
            "bodySite": _cc(t.concept("body_site_lung")),
            "height": height,
            "width": width,
            "content": {
                "contentType": "image/png",
                "data": base64.b64encode(png).decode("ascii"),
                "title": title,
            },
            "note": [
                {
                    "text": f"Where the model looked for {fc.text} "
                    f"(calibrated probability {_fmt(f.calibrated_probability)}); "
                    "an explanation of the score, not a segmentation."
                    + (f" {UNTRAINED_NOTE}" if untrained else "")
                }
            ],
        }
        entries.append(_entry(urn, media, _identifier_entry_condition(*identifier)))
        media_links.append({"comment": title, "link": _ref(urn)})

    report_urn = _urn(report_key, "report")
    sm_sys, sm_value = study_model_identifier(ref.id, analysis.model_version, terminology=t)
    report: Resource = {
        "resourceType": "DiagnosticReport",
        "meta": {"security": security},
        "identifier": [
            {"system": report_sys, "value": report_key},
            {"system": sm_sys, "value": sm_value},
        ],
        "status": "preliminary",
        "category": [_cc(t.concept("report_category"))],
        "code": _cc(t.concept("report_code")),
        "subject": _ref(ref.subject),
    }
    if ref.started:
        report["effectiveDateTime"] = ref.started
    report.update(
        {
            "issued": issued,
            "imagingStudy": [_ref(ref.reference)],
            "result": [_ref(u) for u in obs_refs],
        }
    )
    if media_links:
        report["media"] = media_links
    report["conclusion"] = _conclusion(analysis, untrained, t)
    if positives:
        report["conclusionCode"] = [finding_code(f.finding, terminology=t) for f in positives]
    entries.append(_entry(report_urn, report, _identifier_entry_condition(report_sys, report_key)))

    old_reports: list[str] = []
    supersede_entries: list[Resource] = []
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
        supersede_entries.append(
            {
                "fullUrl": _urn(report_key, f"superseded/{kind}/{oid}"),
                "resource": supersede(old),
                "request": {"method": "PUT", "url": f"{kind}/{oid}"},
            }
        )

    provenance: Resource = {
        "resourceType": "Provenance",
        "target": [_ref(report_urn), *(_ref(u) for u in obs_refs)]
        + [m["link"] for m in media_links],
        "recorded": issued,
        "reason": [_cc(t.concept("ai_asserted"))],
        "activity": _cc(t.concept("provenance_activity_create")),
        "agent": [{"type": _cc(t.concept("provenance_agent_author")), "who": _ref(device_urn)}],
        "entity": [{"role": "source", "what": _ref(ref.versioned_reference)}]
        # R4 DiagnosticReport has no relatesTo; Provenance.entity role "revision" is R4's way
        # to say "the target is a revised version of this": the new report revises the old.
        + [{"role": "revision", "what": _ref(r)} for r in old_reports],
    }
    # Provenance has no identifier in R4: key it on its target. HAPI substitutes the report's
    # placeholder in the condition with the report's real id (new or matched).
    entries.append(_entry(_urn(report_key, "provenance"), provenance, f"target={report_urn}"))
    entries.extend(supersede_entries)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def is_cxr_overlay(media: Mapping[str, Any], *, terminology: Terminology = TERMINOLOGY) -> bool:
    """True for a heatmap Media written by cxr-fhir.

    Overlays share ``partOf`` → ImagingStudy with the input image Media, so the pixel lookup
    must skip them or a re-run would analyse its own heatmap.
    """
    system = terminology.identifier_system("heatmap")
    return any(i.get("system") == system for i in media.get("identifier", []))


# --- withdrawing a report whose image changed -------------------------------------------------

# R4 has no "superseded" status. Its own definitions decide between the two withdrawal codes:
# entered-in-error means "should never have existed ... (if real-world activity has occurred,
# the status should be 'cancelled' rather than 'entered-in-error')". The old report was a
# correct result for the pixels of its time and may have been acted on, so DiagnosticReport and
# Observation become "cancelled"; Media's status set (event-status) names "stopped" in that
# role. EHRs drop cancelled results from current views; "amended"/"corrected" would instead
# claim that the old resource itself now holds the new result.
_WITHDRAWN_STATUS = {
    "DiagnosticReport": "cancelled",
    "Observation": "cancelled",
    "Media": "stopped",
}


def supersede(resource: Mapping[str, Any]) -> Resource:
    """``resource`` (a DiagnosticReport, Observation or Media of ours) withdrawn because the
    study's image changed. Idempotent; ``meta.security`` and everything else are kept."""
    kind = resource.get("resourceType")
    if kind not in _WITHDRAWN_STATUS:
        raise ValueError(f"cannot supersede a {kind}")
    out = copy.deepcopy(dict(resource))
    out["status"] = _WITHDRAWN_STATUS[str(kind)]
    meta = out.get("meta")
    if isinstance(meta, dict):
        # Server-managed; a stale versionId in the body would only mislead readers.
        for key in ("versionId", "lastUpdated"):
            meta.pop(key, None)
    return out


def supersede_report(old_report: Mapping[str, Any]) -> Resource:
    """The old DiagnosticReport withdrawn (status ``cancelled``; see :func:`supersede`).

    The successor links back to it through its Provenance (entity role ``revision``), which
    :func:`build_result_transaction` writes when given ``supersedes=[old_report, ...]``.
    """
    if old_report.get("resourceType") != "DiagnosticReport":
        raise ValueError("supersede_report takes a DiagnosticReport")
    return supersede(old_report)


# --- failure Task ------------------------------------------------------------------------------


def build_failed_task(
    study: Mapping[str, Any],
    reason: str,
    business_status: str,
    *,
    now: datetime | None = None,
    existing_task: Mapping[str, Any] | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The study's analysis Task, failed, with a human-readable ``reason``.

    ``business_status`` is a short code (``no-pixels``, ``undecodable-image``...) for
    machines; ``reason`` is what a person reads. Write it with a conditional update
    (``PUT`` :func:`task_conditional_url`) so that retries update the one Task of the study;
    ``existing_task`` keeps its id and ``authoredOn``. ``now`` defaults to the current time.
    """
    if not reason.strip():
        raise ValueError("a failed Task needs a reason a person can read")
    if not _BUSINESS_CODE.match(business_status):
        raise ValueError(f"business_status must be a lowercase code, got {business_status!r}")
    t = terminology
    ref = StudyRef.from_resource(study)
    system, value = task_identifier(ref.id, terminology=t)
    stamp = _instant(now or datetime.now(UTC))
    task: Resource = {"resourceType": "Task"}
    if existing_task and existing_task.get("id"):
        task["id"] = existing_task["id"]
    version = f" (version {ref.version_id})" if ref.version_id else ""
    task.update(
        {
            "identifier": [{"system": system, "value": value}],
            "status": "failed",
            "statusReason": {"text": reason},
            "businessStatus": {
                "coding": [{"system": t.code_system_url("task"), "code": business_status}],
                "text": business_status,
            },
            "intent": "order",
            "code": _cc(t.concept("task_code")),
            "description": f"AI analysis of {ref.reference}{version} failed: {reason}",
            "focus": _ref(ref.reference),
            "for": _ref(ref.subject),
            "authoredOn": (existing_task or {}).get("authoredOn") or stamp,
            "lastModified": stamp,
        }
    )
    return task


def build_completed_task(
    task: Mapping[str, Any],
    *,
    now: datetime | None = None,
    report_reference: str | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """A study's Task (typically failed earlier) completed by a later successful run.

    ``report_reference`` (``DiagnosticReport/{id}``) becomes ``Task.output`` so the Task
    leads to the result. The failure reason goes: it no longer describes the Task's state.
    """
    t = terminology
    out = copy.deepcopy(dict(task))
    out.pop("meta", None)
    out.pop("statusReason", None)
    out["status"] = "completed"
    out["businessStatus"] = _cc(t.concept("task_business_completed"))
    focus = (task.get("focus") or {}).get("reference", "the study")
    out["description"] = f"AI analysis of {focus} completed"
    out["lastModified"] = _instant(now or datetime.now(UTC))
    if report_reference:
        out["output"] = [
            {"type": _cc(t.concept("task_output_report")), "valueReference": _ref(report_reference)}
        ]
    return out
