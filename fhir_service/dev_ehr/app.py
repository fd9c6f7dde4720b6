"""The dev EHR FastAPI app: launcher pages, the SMART authorization server, the FHIR proxy.

DEVELOPMENT TOOL — not for production: one built-in user, no login, no consent screen.
Production points the cxr app at a real EHR's authorization server and FHIR base.

Routes::

    GET  /launch?patient=…                     patients, each with an "EHR launch" link, and
                                               the user-level (worklist) launch
    GET  /launch/ehr?patient=…                 mint a launch token → {app}/app/launch?iss&launch
    GET  /launch/ehr                           the same with no patient: a user-level launch
    GET  /fhir/.well-known/smart-configuration SMART discovery
    GET  /.well-known/openid-configuration     OpenID discovery (id_token issuer)
    GET  /.well-known/jwks.json                the public signing key
    GET|POST /auth/authorize                   (+ POST /auth/authorize/select: the picker)
    POST /auth/token
    *    /fhir/…                               token-checked proxy in front of HAPI
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import httpx
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_service.api.limits import BodyLimit
from fhir_service.dev_ehr import oauth, pages, proxy
from fhir_service.dev_ehr.context import DevEhr, EhrDep
from fhir_service.dev_ehr.store import GrantStore, Kind
from fhir_service.dev_ehr.tokens import TokenService, load_or_create_key
from fhir_service.settings import Settings

log = logging.getLogger(__name__)

SIGNING_KEY_FILE = "signing-key.pem"
GRANTS_FILE = "grants.sqlite3"


def build_ehr(
    settings: Settings,
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> DevEhr:
    """Keys and grants under ``{data_dir}/dev-ehr``; ``upstream_transport`` stands in for
    HAPI in tests."""
    directory = settings.dev_ehr_dir
    key = load_or_create_key(directory / SIGNING_KEY_FILE)
    return DevEhr(
        settings=settings,
        store=GrantStore(directory / GRANTS_FILE, clock=clock),
        tokens=TokenService(
            key, issuer=settings.dev_ehr_url, fhir_base=settings.dev_ehr_fhir_url, clock=clock
        ),
        upstream=httpx.AsyncClient(
            base_url=settings.fhir_base_url + "/", timeout=60.0, transport=upstream_transport
        ),
        clock=clock,
        clients={c.client_id: c for c in settings.dev_ehr_registered_clients},
    )


def _warn_if_unfiltered(settings: Settings) -> None:
    if not settings.dev_ehr_proxy_filter:
        log.warning(
            "TEST-ONLY: CXR_DEV_EHR_PROXY_FILTER=false — the FHIR proxy does not narrow patient "
            "tokens to their patient; only the app's own checks keep patients apart"
        )


#: The EHR's own pages: the launcher and the launches it starts.
launcher = APIRouter()


@launcher.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/launch", status_code=303)


@launcher.get("/launch", response_model=None)
async def launch_page(ehr: EhrDep, patient: str | None = None) -> Response:
    try:
        patients = await ehr.list_patients()
    except httpx.HTTPError as exc:
        return HTMLResponse(
            pages.error_page("FHIR server unavailable", f"cannot list patients: {exc}"), 502
        )
    if patient:
        patients = [p for p in patients if p.get("id") == patient]
    return HTMLResponse(
        pages.launcher_page(
            patients,
            fhir_base=ehr.fhir_base,
            app_launch=ehr.settings.dev_ehr_launch_target,
            selected=patient,
            user=ehr.settings.dev_ehr_user,
        )
    )


@launcher.get("/launch/ehr", response_model=None)
async def ehr_launch(ehr: EhrDep, patient: str | None = None) -> Response:
    """An EHR launch with ``patient`` in context, or without (``patient`` absent): a
    user-level launch, for which the authorization server grants ``user/`` scopes."""
    if patient is not None:
        try:
            exists = await ehr.patient_exists(patient)
        except httpx.HTTPError as exc:
            return HTMLResponse(
                pages.error_page("FHIR server unavailable", f"cannot check the patient: {exc}"),
                502,
            )
        if not exists:
            return HTMLResponse(
                pages.error_page("Unknown patient", f"Patient {patient!r} does not exist."), 404
            )
    launch = ehr.store.put(
        Kind.LAUNCH, {"patient": patient}, ehr.settings.dev_ehr_launch_lifetime_s
    )
    target = ehr.settings.dev_ehr_launch_target
    return RedirectResponse(
        f"{target}?{urlencode({'iss': ehr.fhir_base, 'launch': launch})}",
        status_code=303,
        headers={"Cache-Control": "no-store"},
    )


def create_app(settings: Settings, *, ehr: DevEhr | None = None) -> FastAPI:
    ehr = ehr or build_ehr(settings)
    _warn_if_unfiltered(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await ehr.aclose()

    app = FastAPI(
        title="cxr dev EHR — DEVELOPMENT TOOL, not for production",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.ehr = ehr
    app.add_middleware(BodyLimit, limit_for=settings.request_limit)
    # Browser-side SMART clients call the token endpoint and the FHIR base cross-origin.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "Accept"],
        expose_headers=["WWW-Authenticate", "Location"],
    )

    app.include_router(launcher)
    app.include_router(oauth.router)
    app.include_router(proxy.router)
    return app
