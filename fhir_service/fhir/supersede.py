"""Withdrawing results: a report whose study image changed (R4 has no "superseded" status),
and every result of a study that was itself entered in error.

The successor of a superseded report links back to it through its Provenance (entity role
``revision``); see :func:`fhir_service.fhir.results.build_result_transaction`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from fhir_service.fhir.datatypes import urn
from fhir_service.fhir.terminology import Resource

__all__ = ["entered_in_error", "entered_in_error_transaction", "supersede", "supersede_report"]

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


def entered_in_error(resource: Mapping[str, Any]) -> Resource:
    """A result of ours (DiagnosticReport, Observation or heatmap Media) whose study was
    entered in error: the result "should never have existed", which is R4's definition of
    ``entered-in-error`` (all three resources have that status). Idempotent."""
    kind = resource.get("resourceType")
    if kind not in _WITHDRAWN_STATUS:
        raise ValueError(f"cannot mark a {kind} entered-in-error")
    out = copy.deepcopy(dict(resource))
    out["status"] = "entered-in-error"
    meta = out.get("meta")
    if isinstance(meta, dict):
        for key in ("versionId", "lastUpdated"):
            meta.pop(key, None)
    return out


def entered_in_error_transaction(study_id: str, resources: Sequence[Mapping[str, Any]]) -> Resource:
    """One transaction marking ``resources`` (read from the server) entered-in-error; those
    already marked are left out, so a repeat writes nothing."""
    entries = []
    for old in resources:
        if old.get("status") == "entered-in-error":
            continue
        if not old.get("id"):
            raise ValueError("withdrawn resources must be read from the server (need an id)")
        kind, oid = old["resourceType"], old["id"]
        entries.append(
            {
                "fullUrl": urn(f"withdrawn-{study_id}", f"{kind}/{oid}"),
                "resource": entered_in_error(old),
                "request": {"method": "PUT", "url": f"{kind}/{oid}"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
