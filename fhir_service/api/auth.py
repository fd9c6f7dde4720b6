"""Who may call ``$similar`` and what they may see (issue 13: it answered anyone who could
reach the port, with studies of every patient).

A caller presents ``Authorization: Bearer …``, one of:

- **the service's own key** (``CXR_SERVICE_API_KEY``): trusted system callers — ``cxr
  similar``, operators, benchmarks — see every patient;
- **a SMART access token** of a configured issuer (``CXR_SIMILAR_ISSUERS``; in dev mode the
  dev EHR). A JWT is checked against the issuer's keys (its JWKS; asymmetric algorithms
  only, so ``alg: none`` and HS256 "signed" with the public key are refused), for ``iss``,
  ``aud`` (the EHR FHIR base the token is for) and ``exp``/``nbf``; an issuer with an
  introspection endpoint is asked instead (RFC 7662), which also knows about revocation.

What the token grants decides what comes back: a token with a ``patient`` (patient
context) needs ``patient/ImagingStudy`` read and search and sees that patient's studies
only; one without, ``user/`` (or ``system/``) ImagingStudy read and search, and sees every
patient. HAPI's forwarder passes the caller's ``Authorization`` through, so the same rules
hold at HAPI's base.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from cxr_errors import ForbiddenError, UnauthorizedError
from fhir_service.settings import Settings, TrustedIssuer

log = logging.getLogger(__name__)

#: Signature algorithms accepted: asymmetric only (never "none", never a shared secret).
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
#: Seconds of clock difference tolerated on ``exp``/``nbf``/``iat``.
LEEWAY_S = 30
#: How long fetched keys are used before they are fetched again; an unknown ``kid`` fetches
#: again at most this often.
JWKS_TTL_S = 300.0
_JWKS_MIN_REFETCH_S = 30.0
_RESOURCE_SCOPE = re.compile(
    r"(?P<context>patient|user|system)/(?P<type>[A-Z][A-Za-z]+|\*)"
    r"\.(?P<perms>read|\*|c?r?u?d?s?)"
)
_V1 = {"read": "rs", "*": "cruds"}


@dataclass(frozen=True)
class Caller:
    """An authenticated caller of ``$similar``: ``patient`` bounds what it sees."""

    kind: Literal["service", "patient", "user", "system"]
    subject: str
    patient: str | None = None

    def __str__(self) -> str:
        bound = f" (Patient/{self.patient})" if self.patient else ""
        return f"{self.kind} {self.subject}{bound}"


def scope_permissions(granted: list[str], context: str, rtype: str) -> set[str]:
    """Letters of ``cruds`` that ``context`` scopes (``patient``, ``user``, ``system``) in
    ``granted`` allow on ``rtype`` (SMART v1 and v2; scopes with a query are ignored)."""
    perms: set[str] = set()
    for scope in granted:
        m = _RESOURCE_SCOPE.fullmatch(scope)
        if m and m.group("context") == context and m.group("type") in ("*", rtype):
            perms |= set(_V1.get(m.group("perms"), m.group("perms")))
    return perms


def caller_from_claims(claims: dict[str, Any], issuer: str) -> Caller:
    """What verified token claims allow: ImagingStudy read and search in the token's own
    context, the patient's studies only when it names one."""
    raw = claims.get("scope", claims.get("scp", ""))
    granted = raw.split() if isinstance(raw, str) else [str(s) for s in raw or []]
    subject = f"{claims.get('sub') or claims.get('client_id') or '?'} from {issuer}"
    patient = claims.get("patient")
    if patient is not None:
        if not isinstance(patient, str) or not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", patient):
            raise UnauthorizedError("the token's patient is not a FHIR id")
        if {"r", "s"} <= scope_permissions(granted, "patient", "ImagingStudy"):
            return Caller("patient", subject, patient)
    elif {"r", "s"} <= scope_permissions(granted, "user", "ImagingStudy"):
        return Caller("user", subject)
    elif {"r", "s"} <= scope_permissions(granted, "system", "ImagingStudy"):
        return Caller("system", subject)
    raise ForbiddenError(
        "the token does not grant read and search of ImagingStudy in its context "
        f"({'patient' if patient is not None else 'user/system'}); granted: "
        f"{' '.join(granted) or 'nothing'}"
    )


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Header and claims of a compact JWS, not verified (to pick the issuer), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        decoded = [json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2]]
    except (binascii.Error, ValueError):
        return None
    header, claims = decoded
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims


class SimilarAuth:
    """Authenticates ``$similar`` callers (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api_key = settings.service_api_key
        self._issuers = {i.issuer.rstrip("/"): i for i in settings.similar_trusted_issuers}
        self._http = httpx.AsyncClient(timeout=10.0, transport=transport)
        self._clock = clock
        self._keys: dict[str, tuple[KeySet, float]] = {}
        #: When an unknown ``kid`` last made us fetch an issuer's keys.
        self._unknown_kid_fetched: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def caller(self, authorization: str | None) -> Caller:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthorizedError(
                "$similar needs Authorization: Bearer <a SMART access token or the service key>"
            )
        if self._api_key and hmac.compare_digest(token.encode(), self._api_key.encode()):
            return Caller("service", "the service key")
        parsed = _unverified(token)
        if parsed is None:
            return await self._introspect_any(token)
        iss = parsed[1].get("iss")
        trusted = self._issuers.get(iss.rstrip("/")) if isinstance(iss, str) else None
        if trusted is None:
            raise UnauthorizedError(f"the token's issuer {iss!r} is not one this service trusts")
        if trusted.introspection_endpoint:
            return await self._introspect(trusted, token)
        claims = await self._verify(trusted, token, parsed[0])
        return caller_from_claims(claims, trusted.issuer)

    # --- JWTs -----------------------------------------------------------------------------

    async def _verify(
        self, trusted: TrustedIssuer, token: str, header: dict[str, Any]
    ) -> dict[str, Any]:
        if header.get("alg") not in ALGORITHMS:
            raise UnauthorizedError(f"token algorithm {header.get('alg')!r} is not accepted")
        keys = await self._keyset(trusted, str(header.get("kid") or ""))
        try:
            decoded = jwt.decode(token, keys, algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                now=lambda: int(self._clock()),
                leeway=LEEWAY_S,
                iss={"essential": True, "value": trusted.issuer.rstrip("/")},
                aud={"essential": True, "value": trusted.audience.rstrip("/")},
                exp={"essential": True},
            ).validate(decoded.claims)
        except JoseError as exc:
            raise UnauthorizedError(f"the token is not valid here: {exc.description}") from exc
        except ValueError as exc:
            raise UnauthorizedError(f"the token is not valid here: {exc}") from exc
        return dict(decoded.claims)

    async def _keyset(self, trusted: TrustedIssuer, kid: str) -> KeySet:
        """The issuer's keys, fetched again when stale or when ``kid`` is new (a key
        rotation, or the issuer restarted with a new key): the first unknown kid fetches at
        once, later ones at most every ``_JWKS_MIN_REFETCH_S``, so tokens with made-up kids
        cannot make us hammer the issuer."""
        async with self._lock:
            now = self._clock()
            cached = self._keys.get(trusted.issuer)
            if cached is not None:
                keys, fetched = cached
                known = not kid or any(k.kid == kid for k in keys.keys)
                if known and now - fetched < JWKS_TTL_S:
                    return keys
                if not known:
                    missed = self._unknown_kid_fetched.get(trusted.issuer)
                    if missed is not None and now - missed < _JWKS_MIN_REFETCH_S:
                        return keys
                    self._unknown_kid_fetched[trusted.issuer] = now
            keys = await self._fetch_keys(trusted)
            self._keys[trusted.issuer] = (keys, now)
            return keys

    async def _fetch_keys(self, trusted: TrustedIssuer) -> KeySet:
        uri = trusted.jwks_uri or await self._discover_jwks(trusted)
        body = await self._get_json(uri, "its JWKS")
        try:
            return KeySet.import_key_set(body)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise UnauthorizedError(f"the JWKS of {trusted.issuer} cannot be read") from exc

    async def _discover_jwks(self, trusted: TrustedIssuer) -> str:
        config = await self._get_json(
            f"{trusted.issuer.rstrip('/')}/.well-known/openid-configuration", "its discovery"
        )
        uri = config.get("jwks_uri")
        if not isinstance(uri, str):
            raise UnauthorizedError(f"{trusted.issuer} publishes no jwks_uri")
        return uri

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            resp = await self._http.get(url, headers={"Accept": "application/json"})
            body = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot read %s at %s: %s", what, url, exc)
            body = None
        if not isinstance(body, dict):
            raise UnauthorizedError(f"the token cannot be checked: {what} at {url} is unavailable")
        return body

    # --- introspection (RFC 7662) -----------------------------------------------------------

    async def _introspect_any(self, token: str) -> Caller:
        for trusted in self._issuers.values():
            if trusted.introspection_endpoint:
                try:
                    return await self._introspect(trusted, token)
                except UnauthorizedError:
                    continue
        raise UnauthorizedError("the token is neither the service key nor a token we can check")

    async def _introspect(self, trusted: TrustedIssuer, token: str) -> Caller:
        assert trusted.introspection_endpoint is not None
        auth: httpx.Auth | None = None
        if trusted.introspection_client_id:
            auth = httpx.BasicAuth(
                trusted.introspection_client_id, trusted.introspection_client_secret or ""
            )
        try:
            resp = await self._http.post(
                trusted.introspection_endpoint,
                data={"token": token},
                auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
            )
            body = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            raise UnauthorizedError(f"the token cannot be checked: {exc}") from exc
        if not isinstance(body, dict) or body.get("active") is not True:
            raise UnauthorizedError("the token is not active")
        self._check_introspected(trusted, body)
        return caller_from_claims(body, trusted.issuer)

    def _check_introspected(self, trusted: TrustedIssuer, body: dict[str, Any]) -> None:
        exp = body.get("exp")
        if isinstance(exp, int | float) and exp + LEEWAY_S < self._clock():
            raise UnauthorizedError("the token has expired")
        iss = body.get("iss")
        if iss is not None and str(iss).rstrip("/") != trusted.issuer.rstrip("/"):
            raise UnauthorizedError("the introspected token names another issuer")
        aud = body.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
        if audiences is not None and trusted.audience.rstrip("/") not in [
            str(a).rstrip("/") for a in audiences
        ]:
            raise UnauthorizedError("the token is for another audience")
