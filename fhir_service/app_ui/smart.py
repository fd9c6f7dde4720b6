"""The SMART App Launch 2.x client side: discovery, PKCE S256, code exchange, refresh.

Discovery is read from ``{iss}/.well-known/smart-configuration`` (SMART 2.x), not from the
CapabilityStatement. The app is a public client (no secret), so PKCE carries the proof.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import httpx

from cxr_errors import FhirError

#: Resource scopes (SMART v2 read + search), the same for both launch kinds.
RESOURCE_SCOPES = (
    "patient/ImagingStudy.rs patient/DiagnosticReport.rs patient/Observation.rs "
    "patient/Media.rs patient/Patient.rs patient/Task.rs"
)
EHR_SCOPES = f"launch openid fhirUser online_access {RESOURCE_SCOPES}"
STANDALONE_SCOPES = f"launch/patient openid fhirUser online_access {RESOURCE_SCOPES}"
#: Refresh this long before the access token expires, so a request never races expiry.
REFRESH_MARGIN_S = 30.0


class LaunchError(FhirError):
    """The SMART launch could not be completed."""


def new_verifier() -> str:
    # RFC 7636 §4.1: 43–128 characters of [A-Za-z0-9-._~]; 48 random bytes → 64 characters.
    return secrets.token_urlsafe(48)


def s256_challenge(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))), unpadded."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def discover(http: httpx.AsyncClient, iss: str) -> dict[str, Any]:
    url = f"{iss.rstrip('/')}/.well-known/smart-configuration"
    try:
        resp = await http.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise LaunchError(f"cannot reach {url}: {exc}") from exc
    if resp.status_code != 200:
        raise LaunchError(f"{url} answered {resp.status_code}")
    config: dict[str, Any] = resp.json()
    for key in ("authorization_endpoint", "token_endpoint"):
        if not isinstance(config.get(key), str):
            raise LaunchError(f"{url} has no {key}")
    methods = config.get("code_challenge_methods_supported") or []
    if "S256" not in methods:
        raise LaunchError(f"{iss} does not support PKCE S256 (SMART 2.x requires it)")
    return config


def authorize_url(
    config: dict[str, Any],
    *,
    client_id: str,
    redirect_uri: str,
    iss: str,
    state: str,
    verifier: str,
    launch: str | None,
) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": EHR_SCOPES if launch else STANDALONE_SCOPES,
        "state": state,
        "aud": iss,
        "code_challenge": s256_challenge(verifier),
        "code_challenge_method": "S256",
    }
    if launch:
        params["launch"] = launch
    endpoint = str(config["authorization_endpoint"])
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"


async def token_request(
    http: httpx.AsyncClient,
    token_endpoint: str,
    form: dict[str, str],
    *,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """POST the token endpoint; the parsed response with ``expires_at`` added."""
    try:
        resp = await http.post(token_endpoint, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise LaunchError(f"cannot reach the token endpoint: {exc}") from exc
    try:
        body: dict[str, Any] = resp.json()
    except ValueError:
        body = {}
    if resp.status_code != 200 or "access_token" not in body:
        error = body.get("error", f"HTTP {resp.status_code}")
        raise LaunchError(f"token request refused: {error}: {body.get('error_description', '')}")
    if str(body.get("token_type", "")).lower() != "bearer":
        raise LaunchError(f"unexpected token_type {body.get('token_type')!r}")
    body["expires_at"] = clock() + float(body.get("expires_in", 300))
    return body
