"""The SMART App Launch 2.x client side: discovery, PKCE S256, code exchange, refresh, and
which mode a launch gives.

Discovery is read from ``{iss}/.well-known/smart-configuration`` (SMART 2.x), not from the
CapabilityStatement. The app is a public client (no secret), so PKCE carries the proof.

Scopes: an EHR launch asks for read/search of the app's six resource types both as
``patient/`` and as ``user/`` scopes, and lets the EHR grant what its launch context allows
(``cxr dev-ehr``: ``patient/`` ones with a patient in context, ``user/`` ones for a launch
from the worklist with none). A standalone launch asks for ``launch/patient`` and
``patient/`` scopes only: it always goes through the EHR's patient picker. The token
response then decides the mode (:func:`launch_mode`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import urlencode

import httpx

from cxr_errors import FhirError

#: The resource types the app reads (SMART v2 read + search on each).
RESOURCE_TYPES = ("ImagingStudy", "DiagnosticReport", "Observation", "Media", "Patient", "Task")
#: One patient's compartment.
RESOURCE_SCOPES = " ".join(f"patient/{t}.rs" for t in RESOURCE_TYPES)
#: Across patients, for the signed-in user (a user-level launch: the worklist of everyone).
USER_RESOURCE_SCOPES = " ".join(f"user/{t}.rs" for t in RESOURCE_TYPES)
EHR_SCOPES = f"launch openid fhirUser online_access {RESOURCE_SCOPES} {USER_RESOURCE_SCOPES}"
STANDALONE_SCOPES = f"launch/patient openid fhirUser online_access {RESOURCE_SCOPES}"
#: Refresh this long before the access token expires, so a request never races expiry.
REFRESH_MARGIN_S = 30.0


#: ``patient``: the launch's patient and their studies; ``user``: all recent studies.
Mode = Literal["patient", "user"]
_USER_SCOPE = re.compile(r"user/(?P<type>[A-Z][A-Za-z]+|\*)\.(?P<perms>read|\*|c?r?u?d?s?)")
_V1_PERMISSIONS = {"read": "rs", "*": "cruds"}


class LaunchError(FhirError):
    """The SMART launch could not be completed."""


def user_permissions(granted: str, resource_type: str) -> frozenset[str]:
    """What the ``user/`` scopes in ``granted`` allow on ``resource_type`` (letters of
    ``cruds``). Granular scopes (``?query``) are ignored: the app cannot honour their
    filter on every search."""
    perms: set[str] = set()
    for scope in granted.split():
        m = _USER_SCOPE.fullmatch(scope)
        if m and m.group("type") in ("*", resource_type):
            perms |= set(_V1_PERMISSIONS.get(m.group("perms"), m.group("perms")))
    return frozenset(perms)


def launch_mode(token: Mapping[str, Any]) -> Mode:
    """The mode a token response gives: ``patient`` when it names a patient (SMART's launch
    context wins, whatever else was granted), else ``user`` when ``user/`` scopes allow
    reading and searching ImagingStudy (the worklist), else :class:`LaunchError`."""
    if token.get("patient"):
        return "patient"
    granted = str(token.get("scope") or "")
    if {"r", "s"} <= user_permissions(granted, "ImagingStudy"):
        return "user"
    raise LaunchError(
        "the EHR gave neither a patient context nor user-level read and search of "
        f"ImagingStudy (granted: {granted or 'nothing'}); launch the app with a patient, "
        "or ask the EHR administrator for user/ImagingStudy.rs"
    )


def id_token_claims(id_token: str | None) -> dict[str, Any]:
    """The claims of an id_token, for display only (``fhirUser``): not verified. OpenID
    Connect Core §3.1.3.7 lets a client rely on TLS instead of the signature for an
    id_token it received directly from the token endpoint; nothing here grants access."""
    if not id_token or id_token.count(".") != 2:
        return {}
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


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
    try:
        config = resp.json()
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise LaunchError(f"{url} did not answer with a JSON object")
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
