"""The SMART App Launch 2.x client side: discovery, PKCE S256, code exchange, refresh, and
which mode a launch gives.

Discovery is ours: one GET of ``{iss}/.well-known/smart-configuration`` (SMART 2.x, not the
CapabilityStatement) with errors that say what is wrong with the EHR. The OAuth 2.0 protocol is
Authlib's (:class:`authlib.oauth2.client.OAuth2Client`): the PKCE S256 challenge (RFC 7636),
the authorization URL, the token request bodies of the code exchange and the refresh, public
client authentication (``token_endpoint_auth_method="none"``: ``client_id`` in the body, no
secret, so PKCE carries the proof) and the parsing of token and error responses.
:class:`SmartClient` only binds it to the app's one ``httpx.AsyncClient`` (Authlib's own httpx
integration binds ``httpx2`` where installed, so it could not share that client's transport)
and adds what SMART asks of the answer: a ``bearer`` token, ``expires_at`` from our clock,
and every refusal as a :class:`TokenError`.

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
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.client import OAuth2Client
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from cxr_errors import FhirError

#: The resource types the app reads (SMART v2 read + search on each).
RESOURCE_TYPES = (
    "ImagingStudy",
    "DiagnosticReport",
    "Observation",
    "Media",
    "Patient",
    "Task",
    # The order a study is based on: its clinical priority leads the worklist.
    "ServiceRequest",
)
#: One patient's compartment.
RESOURCE_SCOPES = " ".join(f"patient/{t}.rs" for t in RESOURCE_TYPES)
#: Across patients, for the signed-in user (a user-level launch: the worklist of everyone).
USER_RESOURCE_SCOPES = " ".join(f"user/{t}.rs" for t in RESOURCE_TYPES)
#: What the app writes, when the EHR grants it (issue 18): an uploaded study, and a
#: radiologist's review. A launch without them reads only ($analyze instead of an upload,
#: no review buttons).
WRITES = ("ImagingStudy.c", "Media.c", "Observation.cu", "DiagnosticReport.u", "Provenance.c")
#: Writes a review needs, and writes an upload needs.
REVIEW_WRITES = {"Observation": "cu", "DiagnosticReport": "u", "Provenance": "c"}
UPLOAD_WRITES = {"ImagingStudy": "c", "Media": "c"}
WRITE_SCOPES = " ".join(f"patient/{w}" for w in WRITES)
USER_WRITE_SCOPES = " ".join(f"user/{w}" for w in WRITES)
EHR_SCOPES = (
    f"launch openid fhirUser online_access {RESOURCE_SCOPES} {USER_RESOURCE_SCOPES} "
    f"{WRITE_SCOPES} {USER_WRITE_SCOPES}"
)
STANDALONE_SCOPES = f"launch/patient openid fhirUser online_access {RESOURCE_SCOPES} {WRITE_SCOPES}"
#: Refresh this long before the access token expires, so a request never races expiry.
REFRESH_MARGIN_S = 30.0


#: ``patient``: the launch's patient and their studies; ``user``: all recent studies.
Mode = Literal["patient", "user"]
_USER_SCOPE = re.compile(r"user/(?P<type>[A-Z][A-Za-z]+|\*)\.(?P<perms>read|\*|c?r?u?d?s?)")
_SCOPE = re.compile(
    r"(?P<context>patient|user)/(?P<type>[A-Z][A-Za-z]+|\*)\.(?P<perms>read|write|\*|c?r?u?d?s?)"
)
_V1_PERMISSIONS = {"read": "rs", "*": "cruds"}
_V1_ANY = {"read": "rs", "write": "cud", "*": "cruds"}


class LaunchError(FhirError):
    """The SMART launch could not be completed."""


class TokenError(LaunchError):
    """The token endpoint refused the request: its ``error`` and ``error_description``, or
    ``HTTP <status>`` when it answered no OAuth error. Authlib raises it (it is the client's
    ``oauth_error_class``) and so do we."""

    def __init__(self, error: Any = None, description: Any = None, **_: Any) -> None:
        self.error = str(error) if error is not None else None
        self.error_description = str(description) if description is not None else None
        super().__init__(f"token request refused: {self.error}: {self.error_description or ''}")


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


def permissions(granted: str, resource_type: str, context: str) -> frozenset[str]:
    """What the ``{context}/`` scopes in ``granted`` allow on ``resource_type`` (letters of
    ``cruds``); granular scopes (``?query``) are ignored."""
    perms: set[str] = set()
    for scope in granted.split():
        m = _SCOPE.fullmatch(scope)
        if m and m.group("context") == context and m.group("type") in ("*", resource_type):
            perms |= set(_V1_ANY.get(m.group("perms"), m.group("perms")))
    return frozenset(perms)


def may_write(granted: str, context: str, needed: Mapping[str, str]) -> bool:
    """Whether ``granted`` allows every write in ``needed`` (type → letters) in ``context``."""
    return all(set(p) <= permissions(granted, t, context) for t, p in needed.items())


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
    """RFC 7636 §4.1: 43–128 characters of the unreserved set; 64 of [A-Za-z0-9] from
    ``random.SystemRandom`` (Authlib's ``generate_token``), ≈ 381 bits."""
    return str(generate_token(64))


def s256_challenge(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))), unpadded (Authlib's)."""
    return str(create_s256_code_challenge(verifier))


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
    """The authorization request (Authlib's ``create_authorization_url``): PKCE S256, the
    SMART ``aud`` and, for an EHR launch, ``launch``; any query of the endpoint is kept."""
    if not verifier:
        raise ValueError("PKCE is not optional: a code verifier is required")
    client = OAuth2Client(
        None, client_id=client_id, redirect_uri=redirect_uri, code_challenge_method="S256"
    )
    url, _ = client.create_authorization_url(
        str(config["authorization_endpoint"]),
        state=state,
        code_verifier=verifier,
        scope=EHR_SCOPES if launch else STANDALONE_SCOPES,
        aud=iss,
        launch=launch or None,  # None: left out
    )
    return str(url)


class SmartClient(OAuth2Client):  # type: ignore[misc]  # Authlib is untyped
    """Authlib's OAuth 2.0 client as a public SMART client, sending through ``http``.

    Authlib builds each token request (grant parameters, ``client_id`` for
    ``token_endpoint_auth_method="none"``, its headers) and parses the answer (JSON object,
    OAuth ``error``); the two hooks below only send the request with our ``httpx`` client and
    check the SMART side of the answer. Made per request: an Authlib client remembers the
    last token it saw, and one user's token has no business in another's request.
    """

    oauth_error_class = TokenError

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        client_id: str,
        redirect_uri: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            session=http,
            client_id=client_id,
            token_endpoint_auth_method="none",
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
        )
        self.http = http
        self.clock = clock

    async def _fetch_token(
        self,
        url: str,
        body: str = "",
        headers: Mapping[str, str] | None = None,
        auth: Any = None,
        method: str = "POST",
        **_: Any,
    ) -> dict[str, Any]:
        return await self._token_request(url, body, headers, auth)

    async def _refresh_token(
        self,
        url: str,
        refresh_token: str | None = None,
        body: str = "",
        headers: Mapping[str, str] | None = None,
        auth: Any = None,
        **_: Any,
    ) -> dict[str, Any]:
        token = await self._token_request(url, body, headers, auth)
        # Rotation: a new refresh token replaces the old one; none in the answer keeps it.
        if not token.get("refresh_token"):
            token["refresh_token"] = refresh_token
        return token

    async def _token_request(
        self, url: str, body: str, headers: Mapping[str, str] | None, auth: Any
    ) -> dict[str, Any]:
        url, sent_headers, body = auth.prepare("POST", url, dict(headers or {}), body)
        try:
            resp = await self.http.post(url, content=body, headers=sent_headers)
        except httpx.HTTPError as exc:
            raise LaunchError(f"cannot reach the token endpoint: {exc}") from exc
        try:
            # Authlib: an OAuth error answer raises TokenError; a 5xx, or an answer that is
            # no JSON object, raises httpx.HTTPStatusError (or ValueError for a 2xx); an
            # ``expires_in`` that is no integer, ValueError or TypeError.
            token = dict(self.parse_response_token(resp))
        except httpx.HTTPStatusError as exc:
            raise TokenError(f"HTTP {resp.status_code}") from exc
        except (TypeError, ValueError) as exc:
            raise TokenError(f"HTTP {resp.status_code}", str(exc)) from exc
        if resp.status_code != 200 or "access_token" not in token:
            raise TokenError(f"HTTP {resp.status_code}")
        if str(token.get("token_type", "")).lower() != "bearer":
            raise LaunchError(f"unexpected token_type {token.get('token_type')!r}")
        # Authlib has read a non-empty one as an integer; none: assume five minutes.
        expires_in = token.get("expires_in")
        lifetime = 300.0 if expires_in in (None, "") else float(expires_in)
        # Ours, not Authlib's (which reads the wall clock): tests use a fake clock.
        token["expires_at"] = self.clock() + lifetime
        return token


async def exchange_code(
    http: httpx.AsyncClient,
    token_endpoint: str,
    *,
    client_id: str,
    redirect_uri: str,
    code: str,
    verifier: str,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The authorization code grant with the PKCE verifier: the token response, with
    ``expires_at`` added (:class:`TokenError` if refused)."""
    client = SmartClient(http, client_id=client_id, redirect_uri=redirect_uri, clock=clock)
    token: dict[str, Any] = await client.fetch_token(
        token_endpoint, grant_type="authorization_code", code=code, code_verifier=verifier
    )
    return token


async def refresh(
    http: httpx.AsyncClient,
    token_endpoint: str,
    *,
    client_id: str,
    refresh_token: str,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The refresh token grant: the token response with ``expires_at`` added and
    ``refresh_token`` the new one, or the one sent when the EHR does not rotate."""
    client = SmartClient(http, client_id=client_id, clock=clock)
    token: dict[str, Any] = await client.refresh_token(token_endpoint, refresh_token=refresh_token)
    return token
