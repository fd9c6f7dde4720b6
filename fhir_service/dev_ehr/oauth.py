"""The SMART App Launch 2.x authorization server: discovery, authorize, token, JWKS.

- ``authorize``: registered client + exact redirect_uri (else an error page, never a
  redirect: RFC 6749 §4.1.2.1); ``state`` required (SMART) and returned unchanged;
  PKCE ``S256`` required, ``plain`` refused; ``aud`` must be this server's FHIR base; an EHR
  launch binds the patient of its ``launch`` token (or, for a user-level launch, no patient:
  ``user/`` scopes, see :mod:`~fhir_service.dev_ehr.scopes`), a standalone launch that asks
  for a patient shows a patient picker. The dev EHR has one signed-in user and no consent
  screen beyond the picker.
- ``token``: ``authorization_code`` with ``code_verifier`` (codes live
  ``dev_ehr_code_lifetime_s``, single-use), ``refresh_token`` (rotated; a replayed code
  or refresh token revokes the whole grant, access tokens included). A request refused
  for any other reason (wrong verifier, redirect_uri or client, a wider scope) uses
  nothing up.
- granted scopes ⊆ requested ∩ the client's registered scopes, ``patient/`` ones with a
  patient in context and read/search ``user/`` ones without (the token response then has
  no ``patient``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from fhir_service.dev_ehr import pages, scopes
from fhir_service.dev_ehr.context import DevEhr, EhrDep, FormError, form_params
from fhir_service.dev_ehr.store import Kind, Outcome, new_token

log = logging.getLogger(__name__)

router = APIRouter()

AUTHORIZE_PATH = "/auth/authorize"
TOKEN_PATH = "/auth/token"
JWKS_PATH = "/.well-known/jwks.json"
#: How long a standalone authorization waits on the patient picker.
PENDING_LIFETIME_S = 600
# RFC 7636 §4.1/§4.2: verifier 43-128 unreserved characters; S256 challenge = 43 base64url.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL-ENCODE(SHA256(ASCII(code_verifier))), unpadded."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def smart_configuration(ehr: DevEhr) -> dict[str, Any]:
    return {
        "issuer": ehr.issuer,
        "jwks_uri": ehr.issuer + JWKS_PATH,
        "authorization_endpoint": ehr.issuer + AUTHORIZE_PATH,
        "token_endpoint": ehr.issuer + TOKEN_PATH,
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": sorted(
            {s for c in ehr.clients.values() for s in scopes.split(c.scope)}
        ),
        "capabilities": [
            "launch-ehr",
            "launch-standalone",
            "client-public",
            "context-ehr-patient",
            "context-standalone-patient",
            "context-banner",
            "permission-patient",
            "permission-user",
            "permission-v2",
            "permission-v1",
            "permission-offline",
            "permission-online",
            "sso-openid-connect",
        ],
    }


@router.get("/fhir/.well-known/smart-configuration")
def smart_config(ehr: EhrDep) -> JSONResponse:
    return JSONResponse(smart_configuration(ehr))


@router.get("/.well-known/openid-configuration")
def openid_config(ehr: EhrDep) -> JSONResponse:
    return JSONResponse(
        {
            "issuer": ehr.issuer,
            "jwks_uri": ehr.issuer + JWKS_PATH,
            "authorization_endpoint": ehr.issuer + AUTHORIZE_PATH,
            "token_endpoint": ehr.issuer + TOKEN_PATH,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "fhirUser", "nonce"],
        }
    )


@router.get(JWKS_PATH)
def jwks(ehr: EhrDep) -> JSONResponse:
    return JSONResponse(ehr.tokens.jwks())


# --- authorize ---------------------------------------------------------------------------


def _with_query(url: str, params: dict[str, str | None]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(k, v) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _redirect(url: str, params: dict[str, str | None], *, after_post: bool) -> RedirectResponse:
    # 303 after a form POST so the browser GETs the redirect_uri.
    return RedirectResponse(
        _with_query(url, params), status_code=303 if after_post else 302, headers=_NO_STORE
    )


def _error_page(status: int, title: str, message: str) -> HTMLResponse:
    return HTMLResponse(pages.error_page(title, message), status_code=status, headers=_NO_STORE)


def _issue_code(ehr: DevEhr, grant: dict[str, Any], *, after_post: bool) -> RedirectResponse:
    family = new_token()
    code = ehr.store.put(Kind.CODE, grant, ehr.settings.dev_ehr_code_lifetime_s, family=family)
    return _redirect(
        grant["redirect_uri"], {"code": code, "state": grant["state"]}, after_post=after_post
    )


@router.api_route(AUTHORIZE_PATH, methods=["GET", "POST"], response_model=None)
async def authorize(request: Request, ehr: EhrDep) -> Response:
    if request.method == "POST":
        try:
            params = await form_params(request)
        except FormError as exc:
            return _error_page(400, "Bad authorization request", str(exc))
        after_post = True
    else:
        params = dict(request.query_params)
        after_post = False

    client = ehr.clients.get(params.get("client_id", ""))
    if client is None:
        return _error_page(400, "Unknown client", "client_id is not registered with this EHR.")
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:
        return _error_page(
            400,
            "Redirect URI not registered",
            f"{redirect_uri!r} is not registered for client {client.client_id!r}.",
        )
    # From here on the client and its redirect URI are known: errors go back to the client.
    state = params.get("state") or None
    try:
        grant = _grant(ehr, params, client.client_id, client.scope, state)
    except _Refused as refused:
        error, description = refused.args
        log.info("authorize refused for %s: %s (%s)", client.client_id, error, description)
        return _redirect(
            redirect_uri,
            {"error": error, "error_description": description, "state": state},
            after_post=after_post,
        )
    if grant["patient"] is None and scopes.needs_patient(grant["scopes"]):
        return await _patient_picker(ehr, grant)
    return _issue_code(ehr, grant, after_post=after_post)


class _Refused(Exception):
    """An authorization request refused with an OAuth ``(error, description)``."""


def _grant(
    ehr: DevEhr, params: dict[str, str], client_id: str, client_scope: str, state: str | None
) -> dict[str, Any]:
    """The grant an authorization request asks for, checked (PKCE S256, aud, launch,
    scopes); raises :class:`_Refused` with what to tell the client."""
    if state is None:
        raise _Refused("invalid_request", "state is required")
    if params.get("response_type") != "code":
        raise _Refused("unsupported_response_type", "response_type must be 'code'")
    if params.get("code_challenge_method") != "S256":
        raise _Refused(
            "invalid_request",
            "PKCE is required with code_challenge_method=S256; 'plain' is refused",
        )
    challenge = params.get("code_challenge", "")
    if not _CHALLENGE.fullmatch(challenge):
        raise _Refused("invalid_request", "code_challenge must be an unpadded base64url SHA-256")
    if params.get("aud", "").rstrip("/") != ehr.fhir_base:
        raise _Refused("invalid_request", f"aud must be this EHR's FHIR base {ehr.fhir_base}")
    launch = params.get("launch") or None
    patient = _launch_patient(ehr, launch)
    requested = params.get("scope")
    context = scopes.launch_context(
        requested, client_scope, ehr_launch=launch is not None, launch_patient=patient
    )
    granted = scopes.grant(requested, client_scope, ehr_launch=launch is not None, context=context)
    if not granted:
        raise _Refused("invalid_scope", "none of the requested scopes can be granted")
    return {
        "client_id": client_id,
        "redirect_uri": params.get("redirect_uri", ""),
        "state": state,
        "code_challenge": challenge,
        "scopes": granted,
        "nonce": params.get("nonce") or None,
        "patient": patient,
    }


def _launch_patient(ehr: DevEhr, launch: str | None) -> str | None:
    """The patient an EHR launch bound (None: standalone, or a user-level launch)."""
    if launch is None:
        return None
    found = ehr.store.get(Kind.LAUNCH, launch)
    if found.outcome is not Outcome.OK or found.data is None:
        raise _Refused("invalid_request", f"launch is {found.outcome.value}; launch again")
    bound = found.data.get("patient")
    # None: a user-level launch (the clinician's worklist, no patient in context).
    return None if bound is None else str(bound)


async def _patient_picker(ehr: DevEhr, grant: dict[str, Any]) -> HTMLResponse:
    """A patient scope without a patient in context: the user picks one first."""
    request_id = ehr.store.put(Kind.PENDING, grant, PENDING_LIFETIME_S)
    try:
        patients = await ehr.list_patients()
    except httpx.HTTPError as exc:  # HAPI down: say so instead of a 500
        log.warning("patient picker: cannot list patients: %s", exc)
        return _error_page(502, "FHIR server unavailable", f"cannot list patients: {exc}")
    return HTMLResponse(
        pages.picker_page(patients, request_id=request_id, client_id=grant["client_id"]),
        headers=_NO_STORE,
    )


@router.post(AUTHORIZE_PATH + "/select", response_model=None)
async def select_patient(request: Request, ehr: EhrDep) -> Response:
    """The picker's form: binds the chosen patient to the pending authorization."""
    try:
        form = await form_params(request)
    except FormError as exc:
        return _error_page(400, "Bad request", str(exc))
    request_id = form.get("request", "")
    pending = ehr.store.get(Kind.PENDING, request_id)
    if pending.outcome is not Outcome.OK or pending.data is None:
        return _error_page(
            400,
            "Authorization expired",
            "This authorization request is unknown or expired; start the launch again.",
        )
    grant = pending.data
    if form.get("action") == "deny":
        ehr.store.delete(Kind.PENDING, request_id)
        return _redirect(
            grant["redirect_uri"],
            {
                "error": "access_denied",
                "error_description": "the user denied access",
                "state": grant["state"],
            },
            after_post=True,
        )
    patient = form.get("patient", "")
    try:
        exists = await ehr.patient_exists(patient)
    except httpx.HTTPError as exc:
        return _error_page(502, "FHIR server unavailable", f"cannot check the patient: {exc}")
    if not exists:
        return _error_page(400, "Unknown patient", f"Patient {patient!r} does not exist.")
    ehr.store.delete(Kind.PENDING, request_id)
    return _issue_code(ehr, {**grant, "patient": patient}, after_post=True)


# --- token -------------------------------------------------------------------------------


def _token_error(error: str, description: str, status: int = 400) -> JSONResponse:
    log.info("token refused: %s (%s)", error, description)
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=_NO_STORE
    )


def _token_response(
    ehr: DevEhr, grant: dict[str, Any], family: str, *, grant_type: str
) -> JSONResponse:
    s = ehr.settings
    granted: list[str] = grant["scopes"]
    # One line per issued token, so a test (or a developer) can see codes and refreshes happen.
    log.info(
        "token issued: grant_type=%s client_id=%s patient=%s scope=%s",
        grant_type,
        grant["client_id"],
        grant.get("patient") or "-",
        " ".join(granted),
    )
    body: dict[str, Any] = {
        "access_token": ehr.tokens.access_token(
            subject=s.dev_ehr_user,
            client_id=grant["client_id"],
            scopes=granted,
            patient=grant.get("patient"),
            family=family,
            lifetime_s=s.dev_ehr_access_token_lifetime_s,
        ),
        "token_type": "Bearer",
        "expires_in": s.dev_ehr_access_token_lifetime_s,
        "scope": " ".join(granted),
    }
    if grant.get("patient"):
        body["patient"] = grant["patient"]
        body["need_patient_banner"] = True
    if "openid" in granted and ("fhirUser" in granted or "profile" in granted):
        body["id_token"] = ehr.tokens.id_token(
            subject=s.dev_ehr_user,
            client_id=grant["client_id"],
            fhir_user=ehr.fhir_user if "fhirUser" in granted else None,
            nonce=grant.get("nonce"),
            lifetime_s=s.dev_ehr_access_token_lifetime_s,
        )
    if scopes.offers_refresh(granted):
        refresh = {k: grant[k] for k in ("client_id", "scopes", "patient")}
        body["refresh_token"] = ehr.store.put(
            Kind.REFRESH, refresh, s.dev_ehr_refresh_token_lifetime_s, family=family
        )
    return JSONResponse(body, headers=_NO_STORE)


_REFUSED = {
    Outcome.UNKNOWN: "is unknown",
    Outcome.EXPIRED: "has expired",
    Outcome.REUSED: "was already used (the grant is now revoked)",
    Outcome.REVOKED: "belongs to a revoked grant",
}


@router.post(TOKEN_PATH, response_model=None)
async def token(request: Request, ehr: EhrDep) -> Response:
    try:
        form = await form_params(request)
    except FormError as exc:
        return _token_error("invalid_request", str(exc))
    client_id = form.get("client_id", "")
    if client_id not in ehr.clients:
        return _token_error("invalid_client", "client_id is missing or not registered", 401)
    grant_type = form.get("grant_type")

    if grant_type == "authorization_code":
        return _redeem_code(ehr, form, client_id)
    if grant_type == "refresh_token":
        return _redeem_refresh(ehr, form, client_id)
    return _token_error(
        "unsupported_grant_type", "grant_type must be authorization_code or refresh_token"
    )


def _code_refusal(grant: dict[str, Any], form: dict[str, str], client_id: str) -> str | None:
    if grant["client_id"] != client_id:
        return "the code was issued to another client"
    if form.get("redirect_uri") != grant["redirect_uri"]:
        return "redirect_uri does not match the authorization"
    verifier = form.get("code_verifier", "")
    if not _VERIFIER.fullmatch(verifier):
        return "code_verifier is missing or malformed"
    if not hmac.compare_digest(s256(verifier), grant["code_challenge"]):
        return "code_verifier does not match code_challenge"
    return None


def _redeem_code(ehr: DevEhr, form: dict[str, str], client_id: str) -> JSONResponse:
    """Check everything before using the code up: a refused request (wrong verifier or
    redirect_uri, another client) leaves it to the client it was issued to. A code already
    used is a replay and revokes its grant (:meth:`GrantStore.peek`)."""
    code = form.get("code")
    if not code:
        return _token_error("invalid_request", "code is required")
    found = ehr.store.peek(Kind.CODE, code)
    if found.outcome is not Outcome.OK or found.data is None:
        return _token_error("invalid_grant", f"the authorization code {_REFUSED[found.outcome]}")
    refusal = _code_refusal(found.data, form, client_id)
    if refusal is not None:
        return _token_error("invalid_grant", f"{refusal} (the code stays unused)")
    taken = ehr.store.take(Kind.CODE, code)  # a concurrent redemption may have won
    if taken.outcome is not Outcome.OK or taken.data is None or taken.family is None:
        return _token_error("invalid_grant", f"the authorization code {_REFUSED[taken.outcome]}")
    return _token_response(ehr, taken.data, taken.family, grant_type="authorization_code")


def _redeem_refresh(ehr: DevEhr, form: dict[str, str], client_id: str) -> JSONResponse:
    """Rotate a refresh token, only when the request is granted: one asking for a wider
    scope, or from another client, is refused and the token stays valid."""
    refresh_token = form.get("refresh_token")
    if not refresh_token:
        return _token_error("invalid_request", "refresh_token is required")
    found = ehr.store.peek(Kind.REFRESH, refresh_token)
    if found.outcome is not Outcome.OK or found.data is None:
        return _token_error("invalid_grant", f"the refresh token {_REFUSED[found.outcome]}")
    grant = found.data
    if grant["client_id"] != client_id:
        return _token_error("invalid_grant", "the refresh token was issued to another client")
    requested = form.get("scope")
    if requested is not None:
        # RFC 6749 §6: a refresh may narrow the scope, never widen it.
        narrowed = scopes.split(requested)
        if not set(narrowed) <= set(grant["scopes"]):
            return _token_error(
                "invalid_scope", "scope exceeds what was granted (the refresh token stays valid)"
            )
        grant = {**grant, "scopes": narrowed}
    taken = ehr.store.take(Kind.REFRESH, refresh_token)
    if taken.outcome is not Outcome.OK or taken.family is None:
        return _token_error("invalid_grant", f"the refresh token {_REFUSED[taken.outcome]}")
    return _token_response(ehr, grant, taken.family, grant_type="refresh_token")
