"""A radiologist's review of the AI findings: one transaction Bundle per submission.

shared/docs/FHIR_PROFILE.md, "A radiologist's review": the AI's assertion is never
overwritten, the human decision is recorded beside it.

- **agree**: the AI Observation becomes ``final`` (``amended`` stays ``amended``: an earlier
  disagreement is not undone by a later agreement);
- **disagree**: it becomes ``amended``;
- **uncertain**: its status stays as it is (nobody verified it);

and in each case the AI Observation gains a ``note`` naming the reviewer, the decision and
the comment (its value, interpretation and AIAST label stay), the reviewer's own
Observation records the human finding (same ``code``, ``interpretation`` POS/NEG — IND for
uncertain —, ``performer`` the Practitioner, ``derivedFrom`` the AI Observation, no AIAST
label, identifier ``{review id}.{AI Observation id}`` so a resubmitted review creates
nothing), and a Provenance names the AI Device as author and the Practitioner as verifier.
When every finding of the report has a review the DiagnosticReport becomes ``final`` with
the Practitioner in ``resultsInterpreter``; a disagreement after that makes it ``amended``.
A second review adds its own Observations and Provenance; nothing is deleted.

Updates carry ``If-Match`` on the version that was read, so two reviewers submitting at once
cannot lose each other's notes: the second transaction fails whole (412) and is re-read.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from fhir_service.fhir.datatypes import cc, identifier_condition, instant, ref, urn
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology

__all__ = [
    "MAX_COMMENT_CHARS",
    "REVIEWER_REFERENCE",
    "ReviewDecision",
    "ReviewError",
    "ReviewRecord",
    "Verdict",
    "build_review_transaction",
    "is_review_observation",
    "review_records",
]

Verdict = Literal["agree", "disagree", "uncertain"]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
MAX_COMMENT_CHARS = 2000
#: A reviewer is a Practitioner (SMART ``fhirUser`` made relative to the FHIR base).
REVIEWER_REFERENCE = re.compile(r"Practitioner/[A-Za-z0-9\-.]{1,64}")
_REVIEW_ID = re.compile(r"[A-Za-z0-9\-]{8,64}")
_VERDICT_TEXT = {"agree": "Agreed", "disagree": "Disagreed", "uncertain": "Uncertain"}
#: Report statuses a complete review turns into ``final``.
_OPEN_REPORT = ("registered", "partial", "preliminary")


class ReviewError(ValueError):
    """A review that cannot be recorded as asked (unknown finding, bad verdict, …)."""


@dataclass(frozen=True)
class ReviewDecision:
    """One reviewer's decision on one AI Observation."""

    observation_id: str
    verdict: Verdict
    comment: str | None = None


@dataclass(frozen=True)
class ReviewRecord:
    """A stored review, read back from the reviewer's Observation."""

    observation_id: str
    """the AI Observation reviewed"""
    verdict: Verdict
    reviewer: str
    comment: str | None
    recorded: str | None
    review_observation_id: str | None
    review_key: str
    """the reviewer Observation's identifier value: ``{review id}.{AI Observation id}``"""


def build_review_transaction(
    report: Mapping[str, Any],
    observations: Mapping[str, Mapping[str, Any]],
    decisions: Sequence[ReviewDecision],
    *,
    reviewer: str,
    reviewed: Mapping[str, Sequence[ReviewRecord]],
    review_id: str,
    recorded: datetime,
    terminology: Terminology = TERMINOLOGY,
) -> Resource | None:
    """The transaction that records ``decisions`` by ``reviewer`` on ``report``, or None when
    every decision is already recorded (a resubmission).

    ``report`` and ``observations`` (the report's AI Observations by id) are as read from
    the server, with ``meta.versionId``; ``reviewed`` holds the reviews already stored, by
    AI Observation id (:func:`review_records`); ``review_id`` (8–64 letters, digits or
    ``-``, chosen once per submission) makes a resubmission create nothing.
    """
    _check(report, observations, decisions, reviewer, review_id)
    t = terminology
    when = instant(recorded)
    stored = {r.review_key for records in reviewed.values() for r in records}
    decisions = [d for d in decisions if f"{review_id}.{d.observation_id}" not in stored]
    if not decisions:
        return None
    entries: list[Resource] = []
    targets: list[Resource] = []
    for d in decisions:
        ai = observations[d.observation_id]
        put = _updated_observation(ai, d, reviewer, when)
        mine = _reviewer_observation(ai, d, reviewer, review_id, when, t)
        entries += [put, mine]
        targets.append(_provenance_entry(ai, [put, mine], reviewer, review_id, when, t))
    done = {k for k, v in reviewed.items() if v} | {d.observation_id for d in decisions}
    report_put = _updated_report(report, decisions, done, reviewer)
    if report_put is not None:
        entries.append(report_put)
        device = (observations[decisions[0].observation_id].get("device") or {}).get("reference")
        provenance = _provenance(
            [report_put["request"]["url"]], [_versioned(report)], device, reviewer, when, t
        )
        targets.append(
            {
                "fullUrl": urn(f"{review_id}.{report['id']}", "review-report-provenance"),
                "resource": provenance,
                "request": {"method": "POST", "url": "Provenance"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": [*entries, *targets]}


def is_review_observation(
    resource: Mapping[str, Any], *, terminology: Terminology = TERMINOLOGY
) -> bool:
    """True for a reviewer's Observation written by :func:`build_review_transaction`."""
    system = terminology.identifier_system("review")
    return resource.get("resourceType") == "Observation" and any(
        i.get("system") == system for i in resource.get("identifier", [])
    )


def review_records(
    resources: Iterable[Mapping[str, Any]],
    ai_observations: Mapping[str, Mapping[str, Any]],
    *,
    terminology: Terminology = TERMINOLOGY,
) -> dict[str, list[ReviewRecord]]:
    """AI Observation id → its reviews, oldest first, read from the reviewers' Observations
    among ``resources`` (others are ignored). The verdict is the reviewer's interpretation
    against the AI's: the same → agree, IND → uncertain, the other → disagree."""
    system = terminology.identifier_system("review")
    out: dict[str, list[ReviewRecord]] = {}
    for res in resources:
        if not is_review_observation(res, terminology=terminology):
            continue
        target = next(
            (t for d in res.get("derivedFrom", []) if (t := _ref_id(d, "Observation"))), None
        )
        ai = ai_observations.get(target or "")
        if target is None or ai is None:
            continue
        mine = _interpretation_code(res)
        verdict: Verdict
        if mine == "IND":
            verdict = "uncertain"
        elif mine is not None and mine == _interpretation_code(ai):
            verdict = "agree"
        else:
            verdict = "disagree"
        performer = (res.get("performer") or [{}])[0].get("reference", "")
        notes = [str(n.get("text", "")) for n in res.get("note", []) if n.get("text")]
        key = next(
            (str(i.get("value")) for i in res.get("identifier", []) if i.get("system") == system),
            "",
        )
        out.setdefault(target, []).append(
            ReviewRecord(
                observation_id=target,
                verdict=verdict,
                reviewer=str(performer),
                comment=notes[0] if notes else None,
                recorded=res.get("issued"),
                review_observation_id=res.get("id"),
                review_key=key,
            )
        )
    for records in out.values():
        records.sort(key=lambda r: str(r.recorded or ""))
    return out


# --- checks -------------------------------------------------------------------------------------


def _check(
    report: Mapping[str, Any],
    observations: Mapping[str, Mapping[str, Any]],
    decisions: Sequence[ReviewDecision],
    reviewer: str,
    review_id: str,
) -> None:
    if report.get("resourceType") != "DiagnosticReport" or not report.get("id"):
        raise ReviewError("a review needs the DiagnosticReport as read from the server")
    if not REVIEWER_REFERENCE.fullmatch(reviewer):
        raise ReviewError(f"the reviewer must be a Practitioner reference, got {reviewer!r}")
    if not _REVIEW_ID.fullmatch(review_id):
        raise ReviewError("review_id must be 8-64 letters, digits or '-'")
    if not decisions:
        raise ReviewError("a review needs at least one decision")
    results = {_ref_id(r, "Observation") for r in report.get("result", [])}
    seen: set[str] = set()
    for d in decisions:
        if d.verdict not in VERDICTS:
            raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}, got {d.verdict!r}")
        if d.observation_id not in results or d.observation_id not in observations:
            raise ReviewError(f"Observation/{d.observation_id} is not a finding of this report")
        if d.observation_id in seen:
            raise ReviewError(f"Observation/{d.observation_id} is decided twice")
        seen.add(d.observation_id)
        if d.comment is not None and len(d.comment) > MAX_COMMENT_CHARS:
            raise ReviewError(f"a comment has at most {MAX_COMMENT_CHARS} characters")
        ai = observations[d.observation_id]
        if not ai.get("id") or not (ai.get("device") or {}).get("reference"):
            raise ReviewError(f"Observation/{d.observation_id} names no AI Device")


# --- entries ------------------------------------------------------------------------------------


def _ref_id(reference: Mapping[str, Any] | None, rtype: str) -> str | None:
    parts = str((reference or {}).get("reference", "")).split("/")
    for i in range(len(parts) - 1):
        if parts[i] == rtype and parts[i + 1]:
            return parts[i + 1]
    return None


def _version(resource: Mapping[str, Any]) -> str | None:
    version = (resource.get("meta") or {}).get("versionId")
    return str(version) if version else None


def _versioned(resource: Mapping[str, Any]) -> str:
    base = f"{resource['resourceType']}/{resource['id']}"
    version = _version(resource)
    return f"{base}/_history/{version}" if version else base


def _put(resource: Resource, full_url: str) -> Resource:
    request: Resource = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    version = _version(resource)
    if version:
        request["ifMatch"] = f'W/"{version}"'
    body = copy.deepcopy(resource)
    meta = body.get("meta")
    if isinstance(meta, dict):
        # Server-managed; HAPI assigns the new ones.
        for key in ("versionId", "lastUpdated"):
            meta.pop(key, None)
    return {"fullUrl": full_url, "resource": body, "request": request}


def _note(d: ReviewDecision, reviewer: str, when: str) -> Resource:
    text = f"{_VERDICT_TEXT[d.verdict]} by {reviewer} (radiologist review)"
    if d.comment and d.comment.strip():
        text += f": {d.comment.strip()}"
    return {"authorReference": ref(reviewer), "time": when, "text": text}


def _updated_observation(
    ai: Mapping[str, Any], d: ReviewDecision, reviewer: str, when: str
) -> Resource:
    obs: Resource = copy.deepcopy(dict(ai))
    status = str(obs.get("status", "preliminary"))
    if d.verdict == "disagree":
        obs["status"] = "amended"
    elif d.verdict == "agree" and status != "amended":
        obs["status"] = "final"
    obs["note"] = [*obs.get("note", []), _note(d, reviewer, when)]
    return _put(obs, urn(f"{_versioned(ai)}:{when}", "reviewed-observation"))


def _interpretation_code(obs: Mapping[str, Any]) -> str | None:
    for concept in obs.get("interpretation", []):
        for coding in concept.get("coding", []):
            if coding.get("code") in ("POS", "NEG", "IND"):
                return str(coding["code"])
    return None


def _human_interpretation(ai: Mapping[str, Any], verdict: Verdict, t: Terminology) -> Resource:
    if verdict == "uncertain":
        return cc(t.concept("interpretation_indeterminate"), "radiologist: uncertain")
    ai_positive = _interpretation_code(ai) == "POS"
    positive = ai_positive if verdict == "agree" else not ai_positive
    name = "interpretation_positive" if positive else "interpretation_negative"
    return cc(t.concept(name), f"radiologist: {'present' if positive else 'absent'}")


def _reviewer_observation(
    ai: Mapping[str, Any],
    d: ReviewDecision,
    reviewer: str,
    review_id: str,
    when: str,
    t: Terminology,
) -> Resource:
    system, value = t.identifier_system("review"), f"{review_id}.{ai['id']}"
    obs: Resource = {
        "resourceType": "Observation",
        "identifier": [{"system": system, "value": value}],
        "status": "final",
        "category": copy.deepcopy(ai.get("category", [])),
        "code": copy.deepcopy(ai["code"]),
        "subject": copy.deepcopy(ai["subject"]),
    }
    if ai.get("effectiveDateTime"):
        obs["effectiveDateTime"] = ai["effectiveDateTime"]
    obs.update(
        {
            "issued": when,
            "performer": [ref(reviewer)],
            "interpretation": [_human_interpretation(ai, d.verdict, t)],
            "derivedFrom": [ref(f"Observation/{ai['id']}")],
        }
    )
    if d.comment and d.comment.strip():
        obs["note"] = [{"authorReference": ref(reviewer), "time": when, "text": d.comment.strip()}]
    return {
        "fullUrl": urn(value, "review-observation"),
        "resource": obs,
        "request": {
            "method": "POST",
            "url": "Observation",
            "ifNoneExist": identifier_condition(system, value),
        },
    }


def _agents(device: str | None, reviewer: str, t: Terminology) -> list[Resource]:
    agents: list[Resource] = []
    if device:
        agents.append({"type": cc(t.concept("provenance_agent_author")), "who": ref(device)})
    agents.append({"type": cc(t.concept("provenance_agent_verifier")), "who": ref(reviewer)})
    return agents


def _provenance(
    targets: list[str],
    sources: list[str],
    device: str | None,
    reviewer: str,
    when: str,
    t: Terminology,
) -> Resource:
    return {
        "resourceType": "Provenance",
        "target": [ref(x) for x in targets],
        "recorded": when,
        "activity": cc(t.concept("provenance_activity_update")),
        "agent": _agents(device, reviewer, t),
        "entity": [{"role": "source", "what": ref(s)} for s in sources],
    }


def _provenance_entry(
    ai: Mapping[str, Any],
    entries: list[Resource],
    reviewer: str,
    review_id: str,
    when: str,
    t: Terminology,
) -> Resource:
    put, mine = entries
    targets = [put["request"]["url"], mine["fullUrl"]]
    device = (ai.get("device") or {}).get("reference")
    provenance = _provenance(targets, [_versioned(ai)], device, reviewer, when, t)
    # Keyed on the reviewer's Observation, which only this review writes: resubmitting the
    # same review matches it instead of adding a second Provenance.
    return {
        "fullUrl": urn(f"{review_id}.{ai['id']}", "review-provenance"),
        "resource": provenance,
        "request": {
            "method": "POST",
            "url": "Provenance",
            "ifNoneExist": f"target={mine['fullUrl']}",
        },
    }


def _updated_report(
    report: Mapping[str, Any],
    decisions: Sequence[ReviewDecision],
    done: set[str],
    reviewer: str,
) -> Resource | None:
    results = [r for r in (_ref_id(x, "Observation") for x in report.get("result", [])) if r]
    status = str(report.get("status", "preliminary"))
    if status in _OPEN_REPORT and all(r in done for r in results):
        new_status = "final"
    elif status in ("final", "amended") and any(d.verdict == "disagree" for d in decisions):
        new_status = "amended"
    else:
        return None
    body: Resource = copy.deepcopy(dict(report))
    body["status"] = new_status
    interpreters = body.get("resultsInterpreter", [])
    if not any(i.get("reference") == reviewer for i in interpreters):
        body["resultsInterpreter"] = [*interpreters, ref(reviewer)]
    return _put(body, urn(f"{_versioned(report)}:{new_status}", "reviewed-report"))
