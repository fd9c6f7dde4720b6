"""FHIR resources (as read through the user's token) → the small JSON the pages draw.

Pure functions over already-fetched resources, so the rules (urgency, status, which report
counts) are testable without a server.

Urgency: a positive Pneumothorax (score at or above its operating threshold) ranks first —
it is the finding that cannot wait; then the highest score among the critical findings. A
score is a calibrated probability only where the Observation says so ("score_kind").
Studies without a result follow: pending (newest first), then failed (their pixels need a
human look without AI help).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fhir_service.fhir.results import is_cxr_overlay
from fhir_service.fhir.terminology import TERMINOLOGY

Resource = dict[str, Any]

#: Findings whose probability sets a study's urgency, most urgent first.
CRITICAL_FINDINGS = ("Pneumothorax", "Edema", "Pneumonia", "Consolidation", "Effusion", "Mass")
_NIH_SYSTEM = TERMINOLOGY.code_system_url("nih_label")
_CONFIDENCE_URL = TERMINOLOGY.extension_url("ai_confidence")
_SPREAD_URL = TERMINOLOGY.extension_url("tta_spread")
#: band kind shown to the user, by extension
_BAND_KINDS = {_CONFIDENCE_URL: "95 % band", _SPREAD_URL: "spread over augmented views"}
_THRESHOLD = TERMINOLOGY.concept("component_threshold")
#: DiagnosticReport statuses that still stand (a superseded report is ``cancelled``).
LIVE_REPORT_STATUSES = ("preliminary", "final", "amended", "corrected", "partial", "registered")
_LIVE_REPORT = LIVE_REPORT_STATUSES
#: A report a radiologist has signed off (every finding reviewed).
REVIEWED_REPORT_STATUSES = ("final", "amended", "corrected")


def entries(bundle: Mapping[str, Any]) -> list[Resource]:
    return [e["resource"] for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]


def ref_id(reference: Mapping[str, Any] | None, rtype: str) -> str | None:
    ref = str((reference or {}).get("reference", ""))
    parts = ref.split("/")
    for i in range(len(parts) - 1):
        if parts[i] == rtype and parts[i + 1]:
            return parts[i + 1]
    return None


def finding_label(obs: Mapping[str, Any]) -> str | None:
    for coding in (obs.get("code") or {}).get("coding", []):
        if coding.get("system") == _NIH_SYSTEM:
            return str(coding.get("code"))
    return None


def finding_of(obs: Mapping[str, Any]) -> dict[str, Any] | None:
    label = finding_label(obs)
    quantity = obs.get("valueQuantity") or {}
    if label is None or "value" not in quantity:
        return None
    low = high = threshold = band_kind = None
    for ext in obs.get("extension", []):
        if ext.get("url") in _BAND_KINDS:
            rng = ext.get("valueRange") or {}
            low = (rng.get("low") or {}).get("value")
            high = (rng.get("high") or {}).get("value")
            band_kind = _BAND_KINDS[ext["url"]]
    for comp in obs.get("component", []):
        codings = (comp.get("code") or {}).get("coding", [])
        if any(
            c.get("system") == _THRESHOLD["system"] and c.get("code") == _THRESHOLD["code"]
            for c in codings
        ):
            threshold = (comp.get("valueQuantity") or {}).get("value")
    probability = float(quantity["value"])
    fc = TERMINOLOGY.findings.get(label)
    interpretation = " ".join(
        str(i.get("text", "")) for i in obs.get("interpretation", []) if isinstance(i, dict)
    )
    # Only our own wording makes a value a probability; anything else is a score.
    calibrated = interpretation.startswith("calibrated probability")
    return {
        "finding": label,
        "text": fc.text if fc else label,
        "score": probability,
        "score_kind": "probability (calibrated)" if calibrated else "uncalibrated score",
        "band_low": low,
        "band_high": high,
        "band_kind": band_kind,
        "threshold": threshold,
        "positive": threshold is not None and probability >= float(threshold),
        "observation": obs.get("id"),
        # preliminary (AI only), final (a radiologist agreed), amended (one disagreed)
        "status": obs.get("status"),
    }


def urgency_key(findings: Iterable[Mapping[str, Any]]) -> tuple[int, float, float]:
    """Larger is more urgent: (pneumothorax positive, max critical probability, pneumothorax)."""
    by = {f["finding"]: f for f in findings}
    ptx = by.get("Pneumothorax")
    critical = [float(by[c]["score"]) for c in CRITICAL_FINDINGS if c in by]
    return (
        1 if ptx and ptx["positive"] else 0,
        max(critical, default=0.0),
        float(ptx["score"]) if ptx else 0.0,
    )


def is_untrained(
    report: Mapping[str, Any] | None, observations: Iterable[Mapping[str, Any]]
) -> bool:
    texts = [str((report or {}).get("conclusion", ""))]
    for obs in observations:
        texts.extend(str(n.get("text", "")) for n in obs.get("note", []))
    return any("untrained" in t.lower() for t in texts)


def latest_reports(reports: Iterable[Mapping[str, Any]]) -> dict[str, Resource]:
    """Study id → its newest live report (superseded ones are ``cancelled``)."""
    out: dict[str, Resource] = {}
    for report in reports:
        if report.get("status") not in _LIVE_REPORT:
            continue
        for study_ref in report.get("imagingStudy", []):
            sid = ref_id(study_ref, "ImagingStudy")
            if sid is None:
                continue
            seen = out.get(sid)
            if seen is None or str(report.get("issued", "")) > str(seen.get("issued", "")):
                out[sid] = dict(report)
    return out


def failed_studies(tasks: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for task in tasks:
        sid = ref_id(task.get("focus"), "ImagingStudy")
        if sid and task.get("status") == "failed":
            out[sid] = str((task.get("statusReason") or {}).get("text", "failed"))
    return out


def study_findings(
    report: Mapping[str, Any] | None, observations: Mapping[str, Resource]
) -> list[dict[str, Any]]:
    if report is None:
        return []
    found = []
    for result in report.get("result", []):
        obs = observations.get(ref_id(result, "Observation") or "")
        f = finding_of(obs) if obs else None
        if f is not None:
            found.append(f)
    return found


def study_header(study: Mapping[str, Any]) -> dict[str, Any]:
    modality = ", ".join(m.get("code", "") for m in study.get("modality", []))
    return {
        "id": study.get("id"),
        "description": study.get("description") or "Chest X-ray",
        "modality": modality,
        "started": study.get("started"),
        # "Time since posting": when the study reached the FHIR server (first version).
        "posted": (study.get("meta") or {}).get("lastUpdated"),
    }


def worklist(
    studies: Iterable[Mapping[str, Any]],
    reports: Iterable[Mapping[str, Any]],
    observations: Mapping[str, Resource],
    tasks: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    latest = latest_reports(reports)
    failed = failed_studies(tasks)
    rows: list[tuple[tuple[int, Any], dict[str, Any]]] = []
    for study in studies:
        sid = str(study.get("id"))
        row = study_header(study)
        report = latest.get(sid)
        if report is not None:
            findings = study_findings(report, observations)
            key = urgency_key(findings)
            top = sorted(findings, key=lambda f: -float(f["score"]))[:3]
            row.update(
                status="done",
                urgency=key[1],
                pneumothorax_positive=bool(key[0]),
                top_findings=top,
                untrained=is_untrained(
                    report, [observations[o] for f in findings if (o := f["observation"])]
                ),
                report_status=report.get("status"),
                # A radiologist reviewed every finding (FHIR_PROFILE.md, "A radiologist's
                # review"); "preliminary" is AI output nobody has verified yet.
                reviewed=report.get("status") in REVIEWED_REPORT_STATUSES,
            )
            rows.append(((0, tuple(-k for k in key)), row))
        elif sid in failed:
            row.update(status="failed", reason=failed[sid])
            rows.append(((2, str(row["posted"] or "")), row))
        else:
            row.update(status="pending")
            rows.append(((1, _desc(str(row["posted"] or ""))), row))
    rows.sort(key=lambda r: r[0])
    return [r for _, r in rows]


def _desc(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


def input_media(media: Iterable[Mapping[str, Any]], study_id: str) -> Resource | None:
    """The newest Media carrying the study's pixels (our heatmaps are not input)."""
    found = [
        dict(m)
        for m in media
        if any(ref_id(p, "ImagingStudy") == study_id for p in m.get("partOf", []))
        and not is_cxr_overlay(m)
        and m.get("status") not in ("entered-in-error", "not-done")
    ]
    found.sort(key=_last_updated, reverse=True)
    return found[0] if found else None


def heatmap_media(media: Iterable[Mapping[str, Any]], study_id: str) -> dict[str, Resource]:
    """Finding label → the study's current stored heatmap Media.

    Only ``completed`` overlays count: a superseded result's overlays are ``stopped`` (see
    :func:`fhir_service.fhir.supersede.supersede`) and must not be shown for the new result. Should
    two current overlays name one finding, the newest wins, whatever the search order.
    """
    out: dict[str, Resource] = {}
    for m in media:
        if not is_cxr_overlay(m) or m.get("status", "completed") != "completed":
            continue
        if not any(ref_id(p, "ImagingStudy") == study_id for p in m.get("partOf", [])):
            continue
        for reason in m.get("reasonCode", []):
            label = finding_label({"code": reason})
            if label and _last_updated(m) >= _last_updated(out.get(label, {})):
                out[label] = dict(m)
    return out


def _last_updated(resource: Mapping[str, Any]) -> str:
    return str((resource.get("meta") or {}).get("lastUpdated", ""))


def patient_label(patient: Mapping[str, Any] | None, patient_id: str) -> str:
    """The name to show for a patient: its first name's text, else given + family names,
    else ``Patient {id}`` (NIH patients carry no name)."""
    names = (patient or {}).get("name") or [{}]
    first = names[0]
    name = first.get("text") or " ".join([*first.get("given", []), first.get("family", "")])
    return str(name).strip() or f"Patient {patient_id}"


def study_patients(
    studies: Iterable[Mapping[str, Any]], patients: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, str]]:
    """Study id → ``{"id", "name"}`` of its subject (``patients`` by id: those the user may
    read; a missing one is shown by its id)."""
    out: dict[str, dict[str, str]] = {}
    for study in studies:
        pid = ref_id(study.get("subject"), "Patient")
        if pid is not None:
            out[str(study.get("id"))] = {"id": pid, "name": patient_label(patients.get(pid), pid)}
    return out


def adhoc_view(bundle: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What the page shows of an ``$analyze`` answer: the findings as for a stored study,
    the conclusion, and each positive finding's heatmap (a PNG data URL)."""
    resources = entries(bundle)
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    findings = [f for f in map(finding_of, observations) if f is not None]
    report = next((r for r in resources if r["resourceType"] == "DiagnosticReport"), {})
    heatmaps = {}
    for media in (r for r in resources if r["resourceType"] == "Media"):
        label = finding_label({"code": (media.get("reasonCode") or [{}])[0]})
        if label is not None:
            heatmaps[label] = f"data:image/png;base64,{media['content']['data']}"
    return {
        "name": name,
        "saved": False,
        "untrained": is_untrained(report, observations),
        "conclusion": report.get("conclusion", ""),
        "findings": sorted(findings, key=lambda f: -float(f["score"])),
        "heatmaps": heatmaps,
    }
