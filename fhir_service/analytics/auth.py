"""Connecting ``fhirclient`` (4.4) to a FHIR base: open, bearer token, or SMART.

fhirclient finds a server's OAuth endpoints only in the ``oauth-uris`` extension of
``/metadata``; SMART App Launch 2.x servers publish them at
``{base}/.well-known/smart-configuration``. So every SMART flow here reads that document
(:func:`smart_configuration`) and seeds fhirclient's ``oauth2`` auth state with the
endpoints itself; fhirclient then does what it really supports (read in its 4.4.0 source):

- **open server** (``auth=None``): no ``Authorization`` header.
- **bearer token** (:class:`BearerToken`): a token the caller already holds is sent as is;
  nothing renews it.
- **SMART Backend Services** (:class:`BackendServices`): fhirclient's ``authorize()`` posts
  ``grant_type=client_credentials`` with a ``client_assertion`` it is given but cannot
  make; we sign that assertion (RS384 or ES384, as SMART asks; ``iss``/``sub`` = client id,
  ``aud`` = token endpoint, 5-minute ``exp``, unique ``jti``) and sign a fresh one whenever
  the server answers 401.
- **client secret** (:class:`ClientSecret`): the same ``client_credentials`` grant with
  HTTP Basic client authentication, which fhirclient sends when it has an app secret.
- **standalone launch** (:class:`StandaloneLaunch`): authorization code with PKCE S256 for
  a person at a browser: fhirclient builds the authorize URL, checks ``state`` and exchanges
  the code; a refresh token (if granted) renews the access token on 401.

fhirclient's ``requests`` session has no timeout; ours gets one (``timeout_s``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from fhirclient.auth import FHIRAuth
from fhirclient.client import FHIRClient
from fhirclient.server import FHIRUnauthorizedException
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from requests.adapters import HTTPAdapter

from cxr_errors import ConfigError, FhirError, FhirUnavailableError, InputError

__all__ = [
    "Auth",
    "BackendServices",
    "BearerToken",
    "ClientSecret",
    "Connection",
    "StandaloneLaunch",
    "connect",
    "open_connection",
    "smart_configuration",
]

log = logging.getLogger(__name__)

#: fhirclient wants an app id even for an open server; it is sent to no one then.
ANONYMOUS_APP_ID = "cxr-analytics"
#: What the findings frame reads: AI Observations and the Devices (model versions) they name.
SYSTEM_SCOPE = "system/Observation.rs system/Device.rs"
USER_SCOPE = "openid fhirUser user/Observation.rs user/Device.rs"
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART Backend Services: the assertion lives at most five minutes.
_ASSERTION_LIFETIME_S = 300


@dataclass(frozen=True)
class BearerToken:
    """An access token the caller already has (from a launch, a notebook secret store…)."""

    access_token: str = field(repr=False)


@dataclass(frozen=True)
class BackendServices:
    """SMART Backend Services: ``client_credentials`` with a private-key JWT assertion.

    ``private_key`` is a PEM private key (RSA for RS384, EC P-384 for ES384) whose public
    half the authorization server holds (its JWKS) under ``key_id``.
    """

    client_id: str
    private_key: str | bytes = field(repr=False)
    key_id: str
    scope: str = SYSTEM_SCOPE
    algorithm: Literal["RS384", "ES384"] = "RS384"


@dataclass(frozen=True)
class ClientSecret:
    """``client_credentials`` with a client secret (HTTP Basic), for servers that allow it."""

    client_id: str
    client_secret: str = field(repr=False)
    scope: str = SYSTEM_SCOPE


class _TimeoutAdapter(HTTPAdapter):
    # fhirclient calls session.get/post without a timeout; a silent server would hang forever.
    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self._timeout_s = timeout_s

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        return super().send(
            request,
            stream=stream,
            timeout=self._timeout_s if timeout is None else timeout,
            verify=verify,
            cert=cert,
            proxies=proxies,
        )


def _session(session: requests.Session | None, timeout_s: float) -> requests.Session:
    if session is not None:
        return session
    own = requests.Session()
    adapter = _TimeoutAdapter(timeout_s)
    own.mount("http://", adapter)
    own.mount("https://", adapter)
    return own


def _base(base_url: str) -> str:
    base = base_url.rstrip("/")
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).netloc:
        raise InputError(f"base_url must be an http(s) FHIR base URL, got {base_url!r}")
    return base


def smart_configuration(
    base_url: str, *, session: requests.Session | None = None, timeout_s: float = 60.0
) -> dict[str, Any]:
    """``{base}/.well-known/smart-configuration`` (SMART App Launch 2.x discovery)."""
    url = f"{_base(base_url)}/.well-known/smart-configuration"
    try:
        resp = _session(session, timeout_s).get(url, headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        raise FhirUnavailableError(f"cannot reach {url}: {exc}") from exc
    if resp.status_code == 404:
        raise ConfigError(
            f"{url} does not exist: the server publishes no SMART configuration "
            "(an open server needs auth=None)"
        )
    if resp.status_code != 200:
        raise FhirError(f"{url} answered {resp.status_code}: {resp.text[:300]}")
    try:
        config = resp.json()
    except ValueError as exc:
        raise FhirError(f"{url} is not JSON: {resp.text[:200]!r}") from exc
    if not isinstance(config, dict):
        raise FhirError(f"{url} is not a JSON object")
    return config


def _endpoint(config: dict[str, Any], name: str, base: str) -> str:
    value = config.get(name)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"the SMART configuration of {base} has no {name}")
    return value


def _client(base: str, app_id: str, session: requests.Session, **settings: Any) -> Any:
    try:
        client = FHIRClient(settings={"app_id": app_id, "api_base": base, **settings})
    except Exception as exc:  # fhirclient: bare Exception for a base it will not take
        raise InputError(f"fhirclient refuses the base URL {base!r}: {exc}") from exc
    client.server.session = session
    # Without a patient_id fhirclient prepends launch/patient to every scope it asks for;
    # our scopes are complete as given.
    client.wants_patient = False
    return client


def _seed_oauth(client: Any, state: dict[str, Any]) -> None:
    client.server.auth = FHIRAuth.create("oauth2", state=state)


def _token_error(exc: Exception, token_uri: str) -> FhirError:
    response = getattr(exc, "response", None)
    if response is None:
        return FhirUnavailableError(f"token request to {token_uri} failed: {exc}")
    kind = FhirUnavailableError if response.status_code >= 500 else FhirError
    return kind(
        f"token request to {token_uri} refused ({response.status_code}): {response.text[:300]}"
    )


def _authorize(client: Any, token_uri: str) -> None:
    try:
        client.authorize()
    except (FHIRUnauthorizedException, requests.RequestException) as exc:
        raise _token_error(exc, token_uri) from exc
    except Exception as exc:  # fhirclient raises bare Exception("No access token received")
        raise FhirError(f"token request to {token_uri} failed: {exc}") from exc


def client_assertion(auth: BackendServices, token_uri: str, *, now: float | None = None) -> str:
    """A signed SMART Backend Services client assertion for ``token_uri``."""
    issued = int(time.time() if now is None else now)
    try:
        if auth.algorithm == "RS384":
            key: RSAKey | ECKey = RSAKey.import_key(auth.private_key)
        else:
            key = ECKey.import_key(auth.private_key)
        header = {"alg": auth.algorithm, "typ": "JWT", "kid": auth.key_id}
        claims = {
            "iss": auth.client_id,
            "sub": auth.client_id,
            "aud": token_uri,
            "iat": issued,
            "exp": issued + _ASSERTION_LIFETIME_S,
            "jti": secrets.token_urlsafe(24),
        }
        return jwt.encode(header, claims, key, algorithms=[auth.algorithm])
    except (JoseError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot sign a {auth.algorithm} client assertion: {exc}") from exc


class StandaloneLaunch:
    """A SMART standalone launch (authorization code + PKCE S256) run by fhirclient.

    1. ``launch = StandaloneLaunch(base, client_id=..., redirect_uri=...)``
    2. open ``launch.authorize_url`` in a browser and sign in;
    3. ``launch.finish(url_the_browser_was_redirected_to)``;
    4. pass ``auth=launch`` to :func:`~fhir_service.analytics.findings_frame`.

    Ask for ``user/`` scopes to read across patients; a scope with ``launch/patient`` or
    ``patient/`` scopes binds one patient (then Devices, outside the patient compartment,
    may be unreadable: ``model_version`` stays empty, ``untrained`` is still set).
    """

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str,
        redirect_uri: str,
        scope: str = USER_SCOPE,
        session: requests.Session | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.base_url = _base(base_url)
        http = _session(session, timeout_s)
        config = smart_configuration(self.base_url, session=http)
        self._token_uri = _endpoint(config, "token_endpoint", self.base_url)
        self.client = _client(
            self.base_url, client_id, http, redirect_uri=redirect_uri, scope=scope
        )
        _seed_oauth(
            self.client,
            {
                "app_id": client_id,
                "aud": self.base_url,
                "authorize_uri": _endpoint(config, "authorization_endpoint", self.base_url),
                "token_uri": self._token_uri,
                "redirect_uri": redirect_uri,
            },
        )

    @property
    def authorize_url(self) -> str:
        """Where the user signs in (carries ``state`` and the PKCE challenge)."""
        return str(self.client.authorize_url)

    def finish(self, callback_url: str) -> None:
        """Check the redirect's ``state`` and exchange its code for an access token."""
        try:
            self.client.handle_callback(callback_url)
        except (FHIRUnauthorizedException, requests.RequestException) as exc:
            raise _token_error(exc, self._token_uri) from exc
        except Exception as exc:  # fhirclient: bare Exception for error / state / no code
            raise InputError(f"the launch did not complete: {exc}") from exc

    @property
    def patient(self) -> str | None:
        """The patient the launch is bound to, if any."""
        pid = self.client.patient_id
        return None if pid is None else str(pid)

    @property
    def ready(self) -> bool:
        return bool(self.client.ready)

    @property
    def access_token(self) -> str | None:
        """The access token once finished (e.g. for :class:`BearerToken` elsewhere)."""
        token = getattr(self.client.server.auth, "access_token", None)
        return None if token is None else str(token)


def _refresh(client: Any) -> bool:
    # fhirclient's reauthorize() fails with a TypeError when there is no refresh token.
    if getattr(client.server.auth, "refresh_token", None) is None:
        return False
    try:
        return bool(client.reauthorize())
    except Exception as exc:  # a refused refresh: the caller reports the original 401
        log.warning("refreshing the access token failed: %s", exc)
        return False


Auth = BearerToken | BackendServices | ClientSecret | StandaloneLaunch


@dataclass
class Connection:
    """A fhirclient client on one base, and how to get a new token after a 401 (if any)."""

    base_url: str
    client: Any
    renew: Callable[[], bool] | None = None

    @property
    def server(self) -> Any:
        return self.client.server


def _credentials(
    base: str, auth: BackendServices | ClientSecret, http: requests.Session
) -> Connection:
    config = smart_configuration(base, session=http)
    token_uri = _endpoint(config, "token_endpoint", base)
    grants = config.get("grant_types_supported")
    if isinstance(grants, list) and "client_credentials" not in grants:
        raise ConfigError(
            f"{base} does not offer client_credentials (grant_types_supported: {grants})"
        )
    client = _client(base, auth.client_id, http, scope=auth.scope)
    state: dict[str, Any] = {"app_id": auth.client_id, "aud": base, "token_uri": token_uri}
    if isinstance(auth, ClientSecret):
        state["app_secret"] = auth.client_secret
    _seed_oauth(client, state)

    def renew() -> bool:
        if isinstance(auth, BackendServices):
            client.server.auth.jwt_token = client_assertion(auth, token_uri)
        _authorize(client, token_uri)
        return True

    renew()
    return Connection(base, client, renew)


def open_connection(
    base_url: str,
    auth: Auth | None = None,
    *,
    session: requests.Session | None = None,
    timeout_s: float = 60.0,
) -> Connection:
    """A ready :class:`Connection` (tokens fetched) for ``base_url`` with ``auth``."""
    base = _base(base_url)
    if isinstance(auth, StandaloneLaunch):
        if auth.base_url != base:
            raise InputError(f"the launch was for {auth.base_url}, not {base}")
        if not auth.ready:
            raise InputError("the standalone launch is not finished: call finish(callback_url)")
        return Connection(base, auth.client, lambda: _refresh(auth.client))
    http = _session(session, timeout_s)
    if isinstance(auth, BackendServices | ClientSecret):
        return _credentials(base, auth, http)
    client = _client(base, ANONYMOUS_APP_ID, http)
    if auth is None:
        client.server.auth = FHIRAuth.create("none", state={"app_id": ANONYMOUS_APP_ID})
    else:
        _seed_oauth(
            client, {"app_id": ANONYMOUS_APP_ID, "aud": base, "access_token": auth.access_token}
        )
    return Connection(base, client)


def connect(
    base_url: str,
    auth: Auth | None = None,
    *,
    session: requests.Session | None = None,
    timeout_s: float = 60.0,
) -> Any:
    """A ready ``fhirclient.client.FHIRClient`` for your own queries, authorized as above."""
    return open_connection(base_url, auth, session=session, timeout_s=timeout_s).client
