"""A radiologist's review from the app: read what is reviewed, write a decision.

Everything goes to the launching EHR with the user's token (never the service's), and the
launch's bounds hold as for reads: the study, its report and every Observation are read
through :class:`~fhir_service.app_ui.service.AppUi` (patient-checked), and the decision is
accepted only for an Observation of that study's live report. The reviewer is the launch's
``fhirUser`` (a Practitioner on the same FHIR base). One submission is one transaction built
by :func:`fhir_service.fhir.review.build_review_transaction`; a conflict (another reviewer
wrote first: 409/412) is re-read and rebuilt, up to :data:`ATTEMPTS` times.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from cxr_errors import FhirError, ForbiddenError, NotFoundError
from fhir_service.app_ui import clinical, smart
from fhir_service.app_ui.service import (
    FHIR_JSON,
    AppUi,
    NotSignedIn,
    outcome_text,
    token_refused,
)
from fhir_service.app_ui.session import AppSession
from fhir_service.fhir.review import (
    REVIEWER_REFERENCE,
    ReviewDecision,
    ReviewRecord,
    build_review_transaction,
    review_records,
)

log = logging.getLogger(__name__)

ATTEMPTS = 3
_CONFLICT = (409, 412)


def reviewer(session: AppSession) -> str | None:
    """The launch's ``fhirUser`` as ``Practitioner/{id}`` on the session's FHIR base, or None
    (no user, another resource type, or a user of another server)."""
    user = session.tokens.fhir_user if session.tokens else None
    if not user or session.iss is None:
        return None
    relative = user.removeprefix(session.iss + "/")
    return relative if REVIEWER_REFERENCE.fullmatch(relative) else None


def context(session: AppSession) -> str:
    """``patient`` or ``user``: which scopes of the grant a write is judged by."""
    return "patient" if session.mode == "patient" else "user"


def can_review(session: AppSession) -> bool:
    tokens = session.tokens
    if tokens is None or reviewer(session) is None:
        return False
    return smart.may_write(tokens.scope, context(session), smart.REVIEW_WRITES)


def can_upload(session: AppSession) -> bool:
    tokens = session.tokens
    if tokens is None or session.mode != "patient":
        return False
    return smart.may_write(tokens.scope, "patient", smart.UPLOAD_WRITES)


async def post_transaction(
    ui: AppUi, session: AppSession, bundle: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """POST ``bundle`` to the EHR's FHIR base with the user's token."""
    return await post_as_user(ui, session, "", bundle)


async def post_as_user(
    ui: AppUi,
    session: AppSession,
    path: str,
    body: dict[str, Any],
    *,
    sign_out_on_401: bool = True,
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to ``{the EHR's FHIR base}{path}`` with the user's token: (status,
    JSON answer, ``{}`` when there is none). A 401 is :class:`NotSignedIn`, or with
    ``sign_out_on_401=False`` (``$similar``, see :meth:`AppUi.fhir`) a :class:`FhirError`."""
    if session.iss is None:
        raise NotSignedIn("not signed in")
    token = await ui.access_token(session)
    try:
        resp = await ui.http.post(
            f"{session.iss}{path}",
            json=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": FHIR_JSON,
                "Content-Type": FHIR_JSON,
            },
        )
    except httpx.HTTPError as exc:
        raise FhirError(f"the FHIR server is unavailable: {exc}") from exc
    if resp.status_code == 401:
        if not sign_out_on_401:
            raise token_refused(path, resp)
        raise NotSignedIn("the FHIR server refused the token")
    try:
        answer = resp.json()
    except ValueError:
        answer = {}
    return resp.status_code, answer if isinstance(answer, dict) else {}


async def study_review_state(
    ui: AppUi, session: AppSession, study_id: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, list[ReviewRecord]]]:
    """The study's live report, its AI Observations by id and their reviews."""
    study = await ui.read(session, "ImagingStudy", study_id)
    if study.status != 200:
        raise NotFoundError(f"ImagingStudy/{study_id} is not available to this user")
    reports, observations, _ = await ui.results_for(session, [study_id])
    report = clinical.latest_reports(reports).get(study_id)
    if report is None:
        raise NotFoundError(f"ImagingStudy/{study_id} has no report to review")
    ours = {
        oid: observations[oid]
        for r in report.get("result", [])
        if (oid := clinical.ref_id(r, "Observation")) and oid in observations
    }
    return report, ours, await reviews_of(ui, session, ours)


async def reviews_of(
    ui: AppUi, session: AppSession, observations: dict[str, dict[str, Any]]
) -> dict[str, list[ReviewRecord]]:
    """The stored reviews of these AI Observations (one search, bound to the launch)."""
    if not observations:
        return {}
    refs = ",".join(f"Observation/{oid}" for oid in observations)
    found = await ui.search(session, "Observation", {"derived-from": refs})
    return review_records(found, observations)


async def submit(
    ui: AppUi,
    session: AppSession,
    study_id: str,
    decisions: list[ReviewDecision],
    review_id: str,
) -> dict[str, Any]:
    """Write one review; returns the report's status afterwards and the transaction's time."""
    who = reviewer(session)
    if who is None:
        raise ForbiddenError("the launch names no Practitioner (fhirUser) to record as reviewer")
    if not can_review(session):
        raise ForbiddenError("the EHR did not grant the write scopes a review needs")
    for attempt in range(ATTEMPTS):
        report, observations, reviews = await study_review_state(ui, session, study_id)
        # A ReviewError (a finding not of this report, …) reaches the route: a 400.
        bundle = build_review_transaction(
            report,
            observations,
            decisions,
            reviewer=who,
            reviewed=reviews,
            review_id=review_id,
            recorded=datetime.now(UTC),
        )
        if bundle is None:
            return {"report_status": report.get("status"), "transaction_ms": 0.0, "stored": True}
        t0 = time.perf_counter()
        status, body = await post_transaction(ui, session, bundle)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if status in _CONFLICT and attempt + 1 < ATTEMPTS:
            log.info("review of ImagingStudy/%s met a concurrent change; re-reading", study_id)
            continue
        if status == 403:
            raise ForbiddenError(f"the EHR refused the review: {outcome_text(body)}")
        if status >= 300:
            raise FhirError(f"the review transaction answered {status}: {outcome_text(body)}")
        log.info(
            "review of ImagingStudy/%s by %s: %d decision(s) in %.0f ms",
            study_id,
            who,
            len(decisions),
            elapsed_ms,
        )
        report_entry = next(
            (e for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"),
            None,
        )
        new_status = report_entry["resource"]["status"] if report_entry else report.get("status")
        return {"report_status": new_status, "transaction_ms": elapsed_ms, "stored": True}
    raise FhirError("the review kept meeting concurrent changes; try again")


async def decorate_study(ui: AppUi, session: AppSession, study: dict[str, Any]) -> dict[str, Any]:
    """The study JSON of the viewer with each finding's reviews, and whether this launch may
    review (the reviewer's own buttons)."""
    findings = study.get("findings") or []
    # Only the AI interpretation matters to tell agree from disagree.
    ai = {
        str(f["observation"]): {
            "interpretation": [{"coding": [{"code": "POS" if f["positive"] else "NEG"}]}]
        }
        for f in findings
        if f.get("observation")
    }
    records = await reviews_of(ui, session, ai) if ai else {}
    for f in findings:
        f["reviews"] = [
            {
                "verdict": r.verdict,
                "reviewer": r.reviewer,
                "comment": r.comment,
                "recorded": r.recorded,
            }
            for r in records.get(str(f.get("observation")), [])
        ]
    report = study.get("report")
    reviewed = sum(1 for f in findings if f["reviews"])
    study["review"] = {
        "can_review": can_review(session) and report is not None,
        "reviewer": reviewer(session),
        "reviewed": reviewed,
        "total": len(findings),
    }
    return study
