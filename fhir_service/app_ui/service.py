"""The app's server side: SMART sessions and FHIR reads made with the user's token.

Every FHIR request goes to the launching EHR's FHIR base (``iss``, for ``cxr dev-ehr`` its
token-checking proxy) with ``Authorization: Bearer <the user's access token>``. The
service's own FHIR client and credentials are never used here, so the app can show nothing
the user's grant does not allow.

Two modes (:func:`fhir_service.app_ui.smart.launch_mode`): in **patient** mode every search
and ``$similar`` call names the launch's patient and every resource is checked against it
before it is shown (:mod:`fhir_service.app_ui.access`: a SMART server need not narrow results
itself), and the app reads that patient's whole record; in **user** mode (a user-level
launch) the user's ``user/`` scopes decide which types are read, and the worklist is the
``RECENT_STUDIES`` most recently updated studies of every patient, with their patients,
reports, Observations and failed Tasks read for exactly those studies: a fixed number of
requests per refresh, whatever the size of the archive.

One concept (a little over 500 lines): every FHIR read the app makes with the user's token,
so the patient checks that guard them are all in one module.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from cxr_errors import FhirError, ImageError, NotFoundError
from fhir_service.app_ui import clinical, smart
from fhir_service.app_ui.access import PATIENT_SEARCH_PARAM, LaunchAccess
from fhir_service.app_ui.heatmaps import HeatmapRenderer
from fhir_service.app_ui.priority import fetch_priorities, with_priority
from fhir_service.app_ui.session import AppSession, SessionStore, Tokens
from fhir_service.issuers import issuer_allowed
from fhir_service.runtime import LazyModels
from fhir_service.settings import Settings

FHIR_JSON = "application/fhir+json"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_PAGE = "100"
_MAX_PAGES = 20
_IMAGE_CACHE = 8
#: How many of the most recently updated studies a user-level worklist shows (one page).
RECENT_STUDIES = 50
#: Reports per page when reading them by study: with their 14 Observations each, a page
#: stays under HAPI's default limit of 1000 ``_include``d resources per page.
_REPORTS_PAGE = "50"

Results = tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[dict[str, Any]]]


class NotSignedIn(Exception):
    """No session, or the session's tokens are gone (relaunch from the EHR)."""


@dataclass
class FhirAnswer:
    status: int
    body: dict[str, Any]


class AppUi:
    def __init__(
        self,
        settings: Settings,
        *,
        models: LazyModels | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # The app's one HTTP client and transport: discovery, the token endpoint (requests
        # that Authlib builds, see smart.SmartClient) and the FHIR calls.
        self.http = httpx.AsyncClient(timeout=30.0, transport=transport)
        self.sessions = SessionStore(
            settings.app_session_secret, lifetime_s=settings.app_session_lifetime_s, clock=clock
        )
        self.heatmaps = HeatmapRenderer(models or LazyModels(settings))

    async def aclose(self) -> None:
        await self.http.aclose()

    @property
    def redirect_uri(self) -> str:
        return f"{self.settings.service_url}/app/callback"

    def issuer_allowed(self, iss: str) -> bool:
        """Whether a launch from ``iss`` may go on: nothing is fetched from, nor redirected
        to, an issuer outside the allow-list (:mod:`fhir_service.issuers`)."""
        return issuer_allowed(iss, self.settings.app_issuer_allow_list)

    # --- tokens ---------------------------------------------------------------------------

    def store_tokens(self, session: AppSession, body: dict[str, Any]) -> None:
        old = session.tokens
        fhir_user = body.get("fhirUser") or smart.id_token_claims(body.get("id_token")).get(
            "fhirUser"
        )
        session.tokens = Tokens(
            access_token=str(body["access_token"]),
            expires_at=float(body["expires_at"]),
            scope=str(body.get("scope", old.scope if old else "")),
            patient=body.get("patient") or (old.patient if old else None),
            refresh_token=body.get("refresh_token") or (old.refresh_token if old else None),
            id_token=body.get("id_token") or (old.id_token if old else None),
            fhir_user=fhir_user or (old.fhir_user if old else None),
        )

    @staticmethod
    def mode(session: AppSession) -> smart.Mode:
        if session.mode is None or session.tokens is None:
            raise NotSignedIn("not signed in")
        return session.mode

    def access(self, session: AppSession) -> LaunchAccess:
        """What this session's launch may show (see :mod:`fhir_service.app_ui.access`)."""
        mode = self.mode(session)
        assert session.tokens is not None
        patient = session.tokens.patient if mode == "patient" else None
        return LaunchAccess(mode=mode, patient=patient, scope=session.tokens.scope)

    async def access_token(self, session: AppSession, *, force_refresh: bool = False) -> str:
        async with session.lock:
            tokens = session.tokens
            if tokens is None or session.token_endpoint is None:
                raise NotSignedIn("not signed in")
            fresh = tokens.expires_at - smart.REFRESH_MARGIN_S > self.clock()
            if fresh and not force_refresh:
                return tokens.access_token
            if not tokens.refresh_token:
                raise NotSignedIn("the access token expired and there is no refresh token")
            try:
                body = await smart.refresh(
                    self.http,
                    session.token_endpoint,
                    client_id=self.settings.app_client_id,
                    refresh_token=tokens.refresh_token,
                    clock=self.clock,
                )
            except smart.LaunchError as exc:
                session.tokens = None
                raise NotSignedIn(str(exc)) from exc
            self.store_tokens(session, body)
            assert session.tokens is not None
            return session.tokens.access_token

    # --- FHIR with the user's token --------------------------------------------------------

    async def fhir(
        self,
        session: AppSession,
        path: str,
        params: dict[str, str] | None = None,
        *,
        sign_out_on_401: bool = True,
    ) -> FhirAnswer:
        """GET with the user's token (refreshed and tried once more on a 401 when there is a
        refresh token). A 401 that stays signs the session out, except with
        ``sign_out_on_401=False``: ``$similar`` is answered
        by the cxr service behind the EHR, whose refusal (e.g. it does not trust this EHR's
        tokens) says nothing about the launch and must not end it."""
        if session.iss is None:
            raise NotSignedIn("not signed in")
        url = path if path.startswith(("http://", "https://")) else f"{session.iss}/{path}"
        if not url.startswith((session.iss + "/", session.iss + "?")):
            # Paging links must stay on the issuer's FHIR base (HAPI's are ``{base}?_getpages=``):
            # the token is only for it.
            raise FhirError(f"refusing to send the user's token to {url}")
        for attempt in range(2):
            token = await self.access_token(session, force_refresh=attempt > 0)
            try:
                resp = await self.http.get(
                    url,
                    params=params,
                    headers={"Authorization": f"Bearer {token}", "Accept": FHIR_JSON},
                )
            except httpx.HTTPError as exc:
                raise FhirError(f"the FHIR server is unavailable: {exc}") from exc
            tokens = session.tokens
            if resp.status_code != 401 or tokens is None or not tokens.refresh_token:
                break
        if resp.status_code == 401:
            if not sign_out_on_401:
                raise token_refused(path, resp)
            session.tokens = None
            raise NotSignedIn("the FHIR server refused the token")
        try:
            body = resp.json()
        except ValueError:
            body = {}
        return FhirAnswer(resp.status_code, body if isinstance(body, dict) else {})

    async def search(
        self, session: AppSession, rtype: str, params: dict[str, str]
    ) -> list[dict[str, Any]]:
        """All pages of a search bound to the launch (the launch's patient in patient mode),
        less any resource the launch may not show."""
        access = self.access(session)
        if not access.may(rtype, "s"):
            return []
        bound = access.search_params(rtype, {"_count": _PAGE, **params})
        answer = await self.fhir(session, rtype, bound)
        found: list[dict[str, Any]] = []
        for _ in range(_MAX_PAGES):
            if answer.status != 200:
                raise FhirError(f"{rtype} search answered {answer.status}")
            found.extend(clinical.entries(answer.body))
            nxt = next(
                (lk["url"] for lk in answer.body.get("link", []) if lk.get("relation") == "next"),
                None,
            )
            if not nxt:
                break
            answer = await self.fhir(session, str(nxt))
        return access.admit(found, f"a {rtype} search")

    async def read(self, session: AppSession, rtype: str, rid: str) -> FhirAnswer:
        """``{rtype}/{rid}``; one the launch may not show is refused (ForbiddenError)."""
        access = self.access(session)
        if not _FHIR_ID.fullmatch(rid) or rid.strip(".") == "":
            return FhirAnswer(404, {})  # not an id: nothing to ask the EHR for
        if not access.may(rtype, "r"):
            return FhirAnswer(403, {})
        answer = await self.fhir(session, f"{rtype}/{rid}")
        if answer.status == 200:
            access.check(answer.body, f"a read of {rtype}/{rid}")
        return answer

    async def patient_data(
        self, session: AppSession
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]], list[Any]]:
        """The launched patient's studies, reports, their Observations and failed Tasks."""
        studies, reports_and_obs, tasks = await asyncio.gather(
            self.search(session, "ImagingStudy", {"_sort": "-_lastUpdated"}),
            self.search(session, "DiagnosticReport", {"_include": "DiagnosticReport:result"}),
            self.search(session, "Task", {"status": "failed"}),
        )
        reports, observations = _split_reports(reports_and_obs)
        return studies, reports, observations, tasks

    async def recent_studies(
        self, session: AppSession
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """User mode: the ``RECENT_STUDIES`` most recently updated studies of any patient, and
        their patients by id (those the user may read), in one request without paging."""
        access = self.access(session)
        params = {"_sort": "-_lastUpdated", "_count": str(RECENT_STUDIES)}
        if access.may("Patient", "r"):
            params["_include"] = "ImagingStudy:subject"
        answer = await self.fhir(
            session, "ImagingStudy", access.search_params("ImagingStudy", params)
        )
        if answer.status != 200:
            raise FhirError(f"ImagingStudy search answered {answer.status}")
        found = access.admit(clinical.entries(answer.body), "the recent-studies search")
        studies = [r for r in found if r.get("resourceType") == "ImagingStudy"]
        patients = {str(r["id"]): r for r in found if r.get("resourceType") == "Patient"}
        return studies[:RECENT_STUDIES], patients

    async def study_results(self, session: AppSession, study_ids: list[str]) -> Results:
        """User mode: the live reports, their Observations and the failed Tasks of exactly
        these studies (bounded by the ids, whatever the patients' other studies)."""
        if not study_ids:
            return [], {}, []
        refs = ",".join(f"ImagingStudy/{sid}" for sid in dict.fromkeys(study_ids))
        reports_and_obs, tasks = await asyncio.gather(
            self.search(
                session,
                "DiagnosticReport",
                {
                    # R4 has no DiagnosticReport search by ImagingStudy; its results are
                    # derivedFrom the study. The typed chain lets the EHR check the scope.
                    "result:Observation.derived-from": refs,
                    "status": ",".join(clinical.LIVE_REPORT_STATUSES),
                    "_include": "DiagnosticReport:result",
                    "_count": _REPORTS_PAGE,
                },
            ),
            self.search(session, "Task", {"focus": refs, "status": "failed"}),
        )
        reports, observations = _split_reports(reports_and_obs)
        return reports, observations, tasks

    async def results_for(self, session: AppSession, study_ids: list[str]) -> Results:
        """Reports, Observations and failed Tasks covering ``study_ids``: the patient's whole
        record in patient mode (the same searches as the worklist), by study in user mode."""
        if self.mode(session) == "user":
            return await self.study_results(session, study_ids)
        _, reports, observations, tasks = await self.patient_data(session)
        return reports, observations, tasks

    async def patients(self, session: AppSession, ids: list[str]) -> dict[str, dict[str, Any]]:
        """User mode: these Patients by id, in one search; empty when the user may not read
        Patients (the app then shows ids)."""
        unique = list(dict.fromkeys(ids))
        if not unique or not self.access(session).may("Patient", "s"):
            return {}
        answer = await self.fhir(
            session, "Patient", {"_id": ",".join(unique), "_count": str(len(unique))}
        )
        if answer.status == 403:
            return {}
        if answer.status != 200:
            raise FhirError(f"Patient search answered {answer.status}")
        found = self.access(session).admit(clinical.entries(answer.body), "a Patient search")
        return {str(r["id"]): r for r in found}

    async def worklist(self, session: AppSession) -> list[dict[str, Any]]:
        if self.mode(session) == "user":
            studies, patients = await self.recent_studies(session)
            reports, observations, tasks = await self.study_results(
                session, [str(s["id"]) for s in studies]
            )
            rows = clinical.worklist(studies, reports, observations, tasks)
            subjects = clinical.study_patients(studies, patients)
            rows = [{**row, "patient": subjects.get(str(row["id"]))} for row in rows]
            return with_priority(rows, await self.priorities(session, studies))
        studies, reports, observations, tasks = await self.patient_data(session)
        rows = clinical.worklist(studies, reports, observations, tasks)
        return with_priority(rows, await self.priorities(session, studies))

    async def priorities(
        self, session: AppSession, studies: list[dict[str, Any]]
    ) -> dict[str, tuple[str, str]]:
        """Study id → (clinical priority, its order) (:mod:`fhir_service.app_ui.priority`)."""

        async def search(rtype: str, params: dict[str, str]) -> list[dict[str, Any]]:
            return await self.search(session, rtype, params)

        return await fetch_priorities(search, studies, by_patient=self.mode(session) == "patient")

    async def study(self, session: AppSession, study_id: str) -> dict[str, Any]:
        # R4 has no DiagnosticReport search by ImagingStudy: read the reports covering the
        # study (see results_for) and pick this study's.
        study_answer, (reports, observations, tasks), media = await asyncio.gather(
            self.read(session, "ImagingStudy", study_id),
            self.results_for(session, [study_id]),
            self.study_media(session, study_id),
        )
        if study_answer.status != 200:
            raise NotFoundError(f"ImagingStudy/{study_id} is not available to this user")
        patient = None
        if self.mode(session) == "user":
            pid = clinical.ref_id(study_answer.body.get("subject"), "Patient")
            if pid is not None:
                found = await self.patients(session, [pid])
                patient = {"id": pid, "name": clinical.patient_label(found.get(pid), pid)}
        report = clinical.latest_reports(reports).get(study_id)
        findings = clinical.study_findings(report, observations)
        stored = clinical.heatmap_media(media, study_id)
        for f in findings:
            f["heatmap"] = "stored" if f["finding"] in stored else "on-demand"
        failed = clinical.failed_studies(tasks).get(study_id)
        status = "done" if report else ("failed" if failed else "pending")
        return {
            **clinical.study_header(study_answer.body),
            "status": status,
            "failure": failed if status == "failed" else None,
            "report": None
            if report is None
            else {
                "id": report.get("id"),
                "status": report.get("status"),
                "conclusion": report.get("conclusion"),
                "issued": report.get("issued"),
                "interpreters": [
                    str(i.get("reference")) for i in report.get("resultsInterpreter", [])
                ],
            },
            "untrained": clinical.is_untrained(
                report, [observations[str(f["observation"])] for f in findings]
            ),
            "findings": findings,
            "heatmap_on_demand": self.settings.app_heatmap_on_demand,
            "patient": patient,
        }

    async def study_media(self, session: AppSession, study_id: str) -> list[dict[str, Any]]:
        return await self.search(session, "Media", {"part-of": f"ImagingStudy/{study_id}"})

    async def image(self, session: AppSession, study_id: str) -> tuple[bytes, str]:
        cache: dict[str, tuple[bytes, str]] = session.extra.setdefault("images", {})
        if study_id in cache:
            return cache[study_id]
        media = clinical.input_media(await self.study_media(session, study_id), study_id)
        if media is None:
            raise NotFoundError(f"ImagingStudy/{study_id} has no image Media")
        content = media.get("content") or {}
        if not content.get("data"):
            # content.url (Binary) is outside the patient compartment the token grants.
            raise ImageError(f"Media/{media.get('id')} carries no inline image data")
        try:
            data = base64.b64decode(str(content["data"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"Media/{media.get('id')} holds invalid base64") from exc
        found = (data, str(content.get("contentType", "application/octet-stream")))
        if len(cache) >= _IMAGE_CACHE:
            cache.pop(next(iter(cache)))
        cache[study_id] = found
        return found

    async def heatmap(self, session: AppSession, study_id: str, finding: str) -> tuple[bytes, str]:
        """The overlay PNG and where it came from: ``stored`` (FHIR Media) or ``rendered``."""
        stored = clinical.heatmap_media(await self.study_media(session, study_id), study_id)
        media = stored.get(finding)
        if media is not None and (media.get("content") or {}).get("data"):
            return base64.b64decode(str(media["content"]["data"])), "stored"
        if not self.settings.app_heatmap_on_demand:
            raise NotFoundError(f"no stored heatmap for {finding} and on-demand rendering is off")
        image, _ = await self.image(session, study_id)
        png = await asyncio.to_thread(self.heatmaps.render, image, finding)
        return png, "rendered"

    async def similar(
        self, session: AppSession, study_id: str | None, params: dict[str, str]
    ) -> list[dict[str, Any]]:
        """``$similar`` matches with their status and findings. In patient mode the call names
        the launch's patient (and the query study must be that patient's), so only the
        patient's own studies come back, each checked again; "same patient" is then always
        true. In user mode matches of every patient come with their patient's name, and "same
        patient" is the queried study's patient."""
        access = self.access(session)
        path = f"ImagingStudy/{study_id}/$similar" if study_id else "ImagingStudy/$similar"
        if access.mode == "user":
            answer, query = await asyncio.gather(
                self.fhir(session, path, params, sign_out_on_401=False),
                self.read(session, "ImagingStudy", study_id) if study_id else _no_answer(),
            )
            matches = self._matches(access, answer)
            same = (
                clinical.ref_id(query.body.get("subject"), "Patient")
                if query.status == 200
                else None
            )
            return await self._user_similar_rows(session, matches, same)
        if study_id:
            # Refused (403) before any search when the study is another patient's.
            await self.read(session, "ImagingStudy", study_id)
        bound = {k: v for k, v in params.items() if k != "exclude-same-patient"}
        bound[PATIENT_SEARCH_PARAM] = str(access.patient)
        answer, (_, reports, observations, tasks) = await asyncio.gather(
            self.fhir(session, path, bound, sign_out_on_401=False), self.patient_data(session)
        )
        matches = self._matches(access, answer)
        rows = clinical.worklist([m for m, _ in matches], reports, observations, tasks)
        return _similar_rows(matches, rows, same=access.patient, subjects={})

    @staticmethod
    def _matches(access: LaunchAccess, answer: FhirAnswer) -> list[tuple[dict[str, Any], Any]]:
        if answer.status != 200:
            issue = (answer.body.get("issue") or [{}])[0]
            raise FhirError(f"$similar answered {answer.status}: {issue.get('diagnostics', '')}")
        matches = [
            (entry.get("resource") or {}, (entry.get("search") or {}).get("score"))
            for entry in answer.body.get("entry", [])
            if (entry.get("resource") or {}).get("resourceType") == "ImagingStudy"
        ]
        shown = {id(r) for r in access.admit([m for m, _ in matches], "a $similar answer")}
        return [(res, score) for res, score in matches if id(res) in shown]

    async def _user_similar_rows(
        self, session: AppSession, matches: list[tuple[dict[str, Any], Any]], same: str | None
    ) -> list[dict[str, Any]]:
        studies = [res for res, _ in matches]
        pids = [p for s in studies if (p := clinical.ref_id(s.get("subject"), "Patient"))]
        (reports, observations, tasks), patients = await asyncio.gather(
            self.study_results(session, [str(s.get("id")) for s in studies]),
            self.patients(session, pids),
        )
        rows = clinical.worklist(studies, reports, observations, tasks)
        subjects = clinical.study_patients(studies, patients)
        return _similar_rows(matches, rows, same=same, subjects=subjects)


def _similar_rows(
    matches: list[tuple[dict[str, Any], Any]],
    worklist_rows: list[dict[str, Any]],
    *,
    same: str | None,
    subjects: dict[str, dict[str, str]],
) -> list[dict[str, Any]]:
    rows = {str(r["id"]): r for r in worklist_rows}
    out = []
    for res, score in matches:
        sid = str(res.get("id"))
        row = rows.get(sid, {})
        out.append(
            {
                **clinical.study_header(res),
                "score": score,
                "same_patient": same is not None
                and clinical.ref_id(res.get("subject"), "Patient") == same,
                "patient": subjects.get(sid),
                "status": row.get("status", "unknown"),
                "findings": [f for f in row.get("top_findings", []) if f.get("positive")]
                or row.get("top_findings", [])[:2],
            }
        )
    return out


def _split_reports(
    resources: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """A report search with ``_include=DiagnosticReport:result`` → (reports, Observations by id)."""
    reports = [r for r in resources if r.get("resourceType") == "DiagnosticReport"]
    observations = {str(r["id"]): r for r in resources if r.get("resourceType") == "Observation"}
    return reports, observations


def outcome_text(body: dict[str, Any]) -> str:
    issues = body.get("issue") or [{}]
    return "; ".join(str(i.get("diagnostics", "")) for i in issues if isinstance(i, dict))[:500]


def token_refused(path: str, resp: httpx.Response) -> FhirError:
    """A 401 from ``$similar`` (the cxr service behind the EHR, see :meth:`AppUi.fhir`): an
    error of that call, with what the answer says, not a sign-out."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    said = outcome_text(body) if isinstance(body, dict) else ""
    return FhirError(f"{path} refused this launch's token: {said or f'HTTP {resp.status_code}'}")


async def _no_answer() -> FhirAnswer:
    return FhirAnswer(404, {})
