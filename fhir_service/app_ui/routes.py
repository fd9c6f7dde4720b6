"""``/app``: the SMART launch endpoints, the pages, and the JSON the pages read.

The browser talks only to this server (same origin); this server calls the EHR's FHIR base
with the session's token (see :mod:`fhir_service.app_ui.service`). Routes::

    GET /app/launch?iss=…&launch=…   EHR launch        (no launch: standalone, launch/patient)
    GET /app/callback?code=…&state=… code exchange → /app/ in patient or user mode
    GET /app/  /app/study/{id}       the worklist and the study viewer (static HTML + JS)
    GET /app/static/{file}           app.js, app.css (no CDN, no external fonts)
    GET /app/api/context | worklist | study/{id} | image/{id} | heatmap/{id}/{finding}
        /app/api/similar?study=…|text=…
    POST /app/logout
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from cxr_errors import CxrError, FhirError, ForbiddenError, ImageError, NotFoundError
from fhir_service.app_ui import clinical, images, review, smart
from fhir_service.app_ui.service import AppUi, NotSignedIn
from fhir_service.app_ui.session import COOKIE, AppSession, Pending

log = logging.getLogger(__name__)

_STATIC = files("fhir_service.app_ui") / "static"
_STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
_PENDING_LIFETIME_S = 600
#: Re-encoded images kept per session (the worklist and similar panel ask for the same ones).
_RENDERED_CACHE = 32
# Everything the pages load comes from this origin (the favicon is a data: URL); no inline
# script or style, no plugins, no <base>, forms post here only; framing only by the EHR
# origins CXR_APP_FRAME_ANCESTORS names (none by default).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors {ancestors}"
)
#: The header a state-changing call carries, holding the session's CSRF token.
CSRF_HEADER = "X-Cxr-Csrf"
_NO_STORE = {"Cache-Control": "no-store"}
_SIMILAR_PARAMS = (
    "count",
    "exclude-same-patient",
    "finding",
    "gender",
    "view-position",
    "age-min",
    "age-max",
    "space",
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ui = AppUi(app.state.settings, models=app.state.models)
    app.state.app_ui = ui
    yield
    await ui.aclose()


router = APIRouter(prefix="/app", lifespan=lifespan, include_in_schema=False)


def _ui(request: Request) -> AppUi:
    ui: AppUi = request.app.state.app_ui
    return ui


UiDep = Annotated[AppUi, Depends(_ui)]


def _session(request: Request, ui: UiDep) -> AppSession:
    session = ui.sessions.from_cookie(request.cookies.get(COOKIE))
    if session is None or session.tokens is None:
        raise NotSignedIn("not signed in")
    return session


def page_csp(frame_ancestors: list[str]) -> str:
    return _CSP.format(ancestors=" ".join(frame_ancestors) or "'none'")


def _page(ui: AppUi, body: str, status: int = 200) -> HTMLResponse:
    csp = page_csp(ui.settings.app_frame_ancestors)
    return HTMLResponse(body, status, headers={"Content-Security-Policy": csp, **_NO_STORE})


def _error_page(ui: AppUi, title: str, message: str, status: int) -> HTMLResponse:
    return _page(
        ui,
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)} — cxr</title>"
        "<link rel='stylesheet' href='/app/static/app.css'></head><body><main class='error'>"
        f"<h1>{html.escape(title)}</h1><p role='alert'>{html.escape(message)}</p>"
        "<p>Open the app again from your EHR.</p></main></body></html>",
        status,
    )


def _set_cookie(response: Response, ui: AppUi, session: AppSession) -> None:
    # Lax, not Strict: the EHR's redirect to /app/callback is a cross-site navigation, and a
    # Strict cookie would not come with it. State-changing calls need the CSRF token too.
    response.set_cookie(
        COOKIE,
        ui.sessions.cookie_value(session),
        max_age=ui.settings.app_session_lifetime_s,
        path="/app",
        httponly=True,
        secure=ui.settings.service_url.startswith("https://"),
        samesite="lax",
    )


@router.get("/launch")
async def launch(
    request: Request,
    ui: UiDep,
    iss: Annotated[str, Query(min_length=1, max_length=2000)],
    launch: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    iss = iss.rstrip("/")
    if not ui.issuer_allowed(iss):
        return _error_page(ui, "Unknown EHR", f"{iss} is not an EHR this app trusts.", 400)
    try:
        config = await smart.discover(ui.http, iss)
    except smart.LaunchError as exc:
        return _error_page(ui, "Launch failed", str(exc), 502)
    # A launch always starts a new session: tokens of an earlier patient must not leak in.
    old = ui.sessions.from_cookie(request.cookies.get(COOKIE))
    if old is not None:
        ui.sessions.drop(old)
    session = ui.sessions.new()
    session.pending = Pending(
        state=secrets.token_urlsafe(24),
        verifier=smart.new_verifier(),
        iss=iss,
        token_endpoint=str(config["token_endpoint"]),
        created=ui.clock(),
    )
    target = smart.authorize_url(
        config,
        client_id=ui.settings.app_client_id,
        redirect_uri=ui.redirect_uri,
        iss=iss,
        state=session.pending.state,
        verifier=session.pending.verifier,
        launch=launch,
    )
    response = RedirectResponse(target, status_code=303, headers=_NO_STORE)
    _set_cookie(response, ui, session)
    return response


@router.get("/callback")
async def callback(
    request: Request,
    ui: UiDep,
    state: str | None = None,
    code: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> Response:
    session = ui.sessions.from_cookie(request.cookies.get(COOKIE))
    pending = session.pending if session else None
    if session is None or pending is None:
        return _error_page(ui, "Launch failed", "no launch in progress in this browser", 400)
    if not state or not secrets.compare_digest(state, pending.state):
        session.pending = None
        return _error_page(ui, "Launch failed", "the state parameter does not match", 400)
    session.pending = None
    if pending.created + _PENDING_LIFETIME_S < ui.clock():
        return _error_page(ui, "Launch failed", "the launch took too long; start again", 400)
    if error or not code:
        return _error_page(ui, "Access not granted", error_description or error or "no code", 403)
    try:
        body = await smart.exchange_code(
            ui.http,
            pending.token_endpoint,
            client_id=ui.settings.app_client_id,
            redirect_uri=ui.redirect_uri,
            code=code,
            verifier=pending.verifier,
            clock=ui.clock,
        )
    except smart.LaunchError as exc:
        return _error_page(ui, "Launch failed", str(exc), 502)
    try:
        mode = smart.launch_mode(body)
    except smart.LaunchError as exc:
        return _error_page(ui, "Launch failed", str(exc), 400)
    session.iss = pending.iss
    session.token_endpoint = pending.token_endpoint
    session.mode = mode
    ui.store_tokens(session, body)
    return RedirectResponse("/app/", status_code=303, headers=_NO_STORE)


def same_origin_with_token(request: Request, ui: AppUi, session: AppSession) -> bool:
    """CSRF defence of a state-changing call: the session's token in ``X-Cxr-Csrf`` (a
    header only same-origin script can set; the token is read from ``/app/api/context``),
    and no ``Origin`` or ``Sec-Fetch-Site`` saying another site sent it."""
    origin = request.headers.get("origin")
    if origin is not None and origin.rstrip("/") != ui.settings.service_url:
        return False
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    given = request.headers.get(CSRF_HEADER, "")
    return secrets.compare_digest(given.encode(), session.csrf.encode())


@router.post("/logout")
async def logout(request: Request, ui: UiDep) -> Response:
    session = ui.sessions.from_cookie(request.cookies.get(COOKIE))
    if session is None:
        return _api_error(401, "not signed in")
    if not same_origin_with_token(request, ui, session):
        log.warning("refused a logout without the session's CSRF token (cross-site?)")
        return _api_error(403, "missing or wrong CSRF token")
    ui.sessions.drop(session)
    response = Response(status_code=204, headers=_NO_STORE)
    response.delete_cookie(COOKIE, path="/app")
    return response


def _static_text(name: str) -> str:
    return (_STATIC / name).read_text(encoding="utf-8")


@router.get("/")
async def worklist_page(ui: UiDep) -> HTMLResponse:
    return _page(ui, _static_text("index.html"))


@router.get("/study/{study_id}")
async def study_page(ui: UiDep, study_id: str) -> HTMLResponse:
    return _page(ui, _static_text("study.html"))


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in _STATIC_FILES:
        return Response(status_code=404)
    return Response(
        (_STATIC / name).read_bytes(),
        media_type=_STATIC_FILES[name],
        headers={"Cache-Control": "no-cache"},
    )


# --- JSON for the pages -----------------------------------------------------------------------


def _api_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=_NO_STORE)


async def _guard(call: Any) -> Any:
    try:
        return await call
    except NotSignedIn as exc:
        return _api_error(401, f"{exc}; open the app again from your EHR")
    except NotFoundError as exc:
        return _api_error(404, str(exc))
    except ForbiddenError as exc:
        return _api_error(403, str(exc))
    except ImageError as exc:
        return _api_error(exc.http_status, str(exc))
    except FhirError as exc:
        return _api_error(502, str(exc))
    except CxrError as exc:
        log.warning("app request failed: %s", exc)
        return _api_error(500, str(exc))


def _json(body: Any) -> JSONResponse:
    return JSONResponse(body, headers=_NO_STORE)


@router.get("/api/context")
async def context(request: Request, ui: UiDep) -> Response:
    async def run() -> Response:
        session = _session(request, ui)
        tokens = session.tokens
        assert tokens is not None
        mode = ui.mode(session)
        context: dict[str, Any] = {
            "mode": mode,
            "patient": None,
            "user": tokens.fhir_user,
            "iss": session.iss,
            "poll_interval_s": ui.settings.app_poll_interval_s,
            "csrf": session.csrf,
            "can_review": review.can_review(session),
            "can_upload": review.can_upload(session),
            "reviewer": review.reviewer(session),
        }
        if mode == "patient" and tokens.patient is not None:
            patient = await ui.read(session, "Patient", tokens.patient)
            context["patient"] = {
                "id": tokens.patient,
                "name": clinical.patient_label(patient.body, tokens.patient),
                "gender": patient.body.get("gender"),
                "birthDate": patient.body.get("birthDate"),
            }
        return _json(context)

    result: Response = await _guard(run())
    return result


@router.get("/api/worklist")
async def worklist(request: Request, ui: UiDep) -> Response:
    async def run() -> Response:
        return _json({"studies": await ui.worklist(_session(request, ui))})

    result: Response = await _guard(run())
    return result


@router.get("/api/study/{study_id}")
async def study(request: Request, ui: UiDep, study_id: str) -> Response:
    async def run() -> Response:
        session = _session(request, ui)
        return _json(await review.decorate_study(ui, session, await ui.study(session, study_id)))

    result: Response = await _guard(run())
    return result


@router.get("/api/image/{study_id}")
async def image(
    request: Request,
    ui: UiDep,
    study_id: str,
    size: Annotated[int | None, Query(ge=32, le=1024)] = None,
) -> Response:
    """The study's X-ray as a PNG our decoder wrote (never the stored bytes, whatever the
    Media's contentType); a thumbnail (``size``) of an undecodable image is a placeholder."""

    async def run() -> Response:
        session = _session(request, ui)
        cache: dict[tuple[str, int | None], tuple[bytes, str]] = session.extra.setdefault(
            "rendered", {}
        )
        if (study_id, size) not in cache:
            try:
                data, _ = await ui.image(session, study_id)
            except ImageError:
                if size is None:
                    raise
                data = b""  # a Media without usable bytes: its thumbnail is the placeholder
            limits = {
                "max_bytes": ui.settings.max_image_bytes,
                "max_pixels": ui.settings.max_image_pixels,
            }
            if size is None:
                png = await asyncio.to_thread(images.display_png, data, size=None, **limits)
                kind = "image"
            else:
                png, decoded = await asyncio.to_thread(
                    images.thumbnail_png, data, size=size, **limits
                )
                kind = "image" if decoded else "placeholder"
            if len(cache) >= _RENDERED_CACHE:
                cache.pop(next(iter(cache)))
            cache[(study_id, size)] = (png, kind)
        png, kind = cache[(study_id, size)]
        return Response(
            png, media_type=images.PNG, headers={"Cache-Control": "private", "X-Cxr-Image": kind}
        )

    result: Response = await _guard(run())
    return result


@router.get("/api/heatmap/{study_id}/{finding}")
async def heatmap(request: Request, ui: UiDep, study_id: str, finding: str) -> Response:
    async def run() -> Response:
        png, source = await ui.heatmap(_session(request, ui), study_id, finding)
        if source == "stored":
            png = await asyncio.to_thread(images.overlay_png, png)
        return Response(
            png,
            media_type=images.PNG,
            headers={"Cache-Control": "private", "X-Cxr-Heatmap": source},
        )

    result: Response = await _guard(run())
    return result


@router.get("/api/similar")
async def similar(
    request: Request,
    ui: UiDep,
    study: Annotated[str | None, Query(max_length=64)] = None,
    text: Annotated[str | None, Query(max_length=500)] = None,
) -> Response:
    async def run() -> Response:
        if bool(study) == bool(text and text.strip()):
            return _api_error(400, "give either study or text")
        params = {k: v for k, v in request.query_params.items() if k in _SIMILAR_PARAMS and v}
        if text:
            params["text"] = text.strip()
        return _json({"results": await ui.similar(_session(request, ui), study, params)})

    result: Response = await _guard(run())
    return result
