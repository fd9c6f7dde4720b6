"""The app's server side: SMART sessions and FHIR reads made with the user's token.

Every FHIR request goes to the launching EHR's FHIR base (``iss``, for ``cxr dev-ehr`` its
patient-compartment proxy) with ``Authorization: Bearer <the user's access token>``. The
service's own FHIR client and credentials are never used here, so the app can show nothing
the user's grant does not allow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from cxr_errors import FhirError, NotFoundError
from fhir_service.app_ui import clinical, smart
from fhir_service.app_ui.heatmaps import HeatmapRenderer
from fhir_service.app_ui.session import AppSession, SessionStore, Tokens
from fhir_service.settings import Settings

FHIR_JSON = "application/fhir+json"
_PAGE = "100"
_MAX_PAGES = 20
_IMAGE_CACHE = 8


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
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.http = httpx.AsyncClient(timeout=30.0, transport=transport)
        self.sessions = SessionStore(
            settings.app_session_secret, lifetime_s=settings.app_session_lifetime_s, clock=clock
        )
        self.heatmaps = HeatmapRenderer(settings)

    async def aclose(self) -> None:
        await self.http.aclose()

    @property
    def redirect_uri(self) -> str:
        return f"{self.settings.service_url}/app/callback"

    def issuer_allowed(self, iss: str) -> bool:
        allowed = [i.rstrip("/") for i in self.settings.app_issuers]
        if allowed:
            return iss.rstrip("/") in allowed
        return self.settings.mode == "dev" and iss.startswith(("http://", "https://"))

    # --- tokens ---------------------------------------------------------------------------

    def store_tokens(self, session: AppSession, body: dict[str, Any]) -> None:
        old = session.tokens
        session.tokens = Tokens(
            access_token=str(body["access_token"]),
            expires_at=float(body["expires_at"]),
            scope=str(body.get("scope", old.scope if old else "")),
            patient=body.get("patient") or (old.patient if old else None),
            refresh_token=body.get("refresh_token") or (old.refresh_token if old else None),
            id_token=body.get("id_token") or (old.id_token if old else None),
            fhir_user=body.get("fhirUser") or (old.fhir_user if old else None),
        )

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
                body = await smart.token_request(
                    self.http,
                    session.token_endpoint,
                    {
                        "grant_type": "refresh_token",
                        "refresh_token": tokens.refresh_token,
                        "client_id": self.settings.app_client_id,
                    },
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
        self, session: AppSession, path: str, params: dict[str, str] | None = None
    ) -> FhirAnswer:
        if session.iss is None:
            raise NotSignedIn("not signed in")
        url = path if path.startswith(("http://", "https://")) else f"{session.iss}/{path}"
        if not url.startswith(session.iss + "/"):
            # Paging links must stay on the issuer's FHIR base: the token is only for it.
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
            if resp.status_code != 401:
                break
        if resp.status_code == 401:
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
        answer = await self.fhir(session, rtype, {"_count": _PAGE, **params})
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
        return found

    async def patient_data(
        self, session: AppSession
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]], list[Any]]:
        """The launched patient's studies, reports, their Observations and failed Tasks."""
        studies, reports_and_obs, tasks = await asyncio.gather(
            self.search(session, "ImagingStudy", {"_sort": "-_lastUpdated"}),
            self.search(session, "DiagnosticReport", {"_include": "DiagnosticReport:result"}),
            self.search(session, "Task", {"status": "failed"}),
        )
        reports = [r for r in reports_and_obs if r.get("resourceType") == "DiagnosticReport"]
        observations = {
            str(r["id"]): r for r in reports_and_obs if r.get("resourceType") == "Observation"
        }
        return studies, reports, observations, tasks

    async def worklist(self, session: AppSession) -> list[dict[str, Any]]:
        studies, reports, observations, tasks = await self.patient_data(session)
        return clinical.worklist(studies, reports, observations, tasks)

    async def study(self, session: AppSession, study_id: str) -> dict[str, Any]:
        # R4 has no DiagnosticReport search by ImagingStudy: read the patient's reports (the
        # same searches as the worklist) and pick this study's.
        study_answer, (_, reports, observations, tasks), media = await asyncio.gather(
            self.fhir(session, f"ImagingStudy/{study_id}"),
            self.patient_data(session),
            self.study_media(session, study_id),
        )
        if study_answer.status != 200:
            raise NotFoundError(f"ImagingStudy/{study_id} is not available to this user")
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
            },
            "untrained": clinical.is_untrained(
                report, [observations[str(f["observation"])] for f in findings]
            ),
            "findings": findings,
            "heatmap_on_demand": self.settings.app_heatmap_on_demand,
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
            raise NotFoundError(f"Media/{media.get('id')} carries no inline image data")
        try:
            data = base64.b64decode(str(content["data"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise NotFoundError(f"Media/{media.get('id')} holds invalid base64") from exc
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
        path = f"ImagingStudy/{study_id}/$similar" if study_id else "ImagingStudy/$similar"
        answer, (studies, reports, observations, tasks) = await asyncio.gather(
            self.fhir(session, path, params), self.patient_data(session)
        )
        if answer.status != 200:
            issue = (answer.body.get("issue") or [{}])[0]
            raise FhirError(f"$similar answered {answer.status}: {issue.get('diagnostics', '')}")
        rows = {str(r["id"]): r for r in clinical.worklist(studies, reports, observations, tasks)}
        tokens = session.tokens
        out = []
        for entry in answer.body.get("entry", []):
            res = entry.get("resource") or {}
            if res.get("resourceType") != "ImagingStudy":
                continue
            sid = str(res.get("id"))
            row = rows.get(sid, {})
            out.append(
                {
                    **clinical.study_header(res),
                    "score": (entry.get("search") or {}).get("score"),
                    "same_patient": clinical.ref_id(res.get("subject"), "Patient")
                    == (tokens.patient if tokens else None),
                    "status": row.get("status", "unknown"),
                    "findings": [f for f in row.get("top_findings", []) if f.get("positive")]
                    or row.get("top_findings", [])[:2],
                }
            )
        return out
