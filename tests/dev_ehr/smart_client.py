"""A SMART App Launch 2.x client played by the tests: discovery, PKCE, authorize, picker,
token, refresh — following redirects by hand so every hop can be checked.

PKCE is computed here independently of the server (RFC 7636 §4.2) on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

RESOURCE_SCOPES = (
    "patient/Patient.rs patient/ImagingStudy.rs patient/DiagnosticReport.rs "
    "patient/Observation.rs patient/Media.rs"
)
USER_RESOURCE_SCOPES = (
    "user/Patient.rs user/ImagingStudy.rs user/DiagnosticReport.rs "
    "user/Observation.rs user/Media.rs"
)
EHR_SCOPES = f"launch openid fhirUser online_access {RESOURCE_SCOPES}"
STANDALONE_SCOPES = f"launch/patient openid fhirUser online_access {RESOURCE_SCOPES}"
#: What the cxr app asks for in an EHR launch: the EHR grants one half or the other.
BOTH_SCOPES = f"{EHR_SCOPES} {USER_RESOURCE_SCOPES}"


def new_verifier() -> str:
    return secrets.token_urlsafe(48)


def challenge_for(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


class Response(Protocol):
    status_code: int
    text: str

    @property
    def headers(self) -> Any: ...

    def json(self) -> Any: ...


class HttpClient(Protocol):
    """httpx.Client, or Starlette's TestClient (which is built on httpx2)."""

    def get(self, url: str, **kwargs: Any) -> Any: ...
    def post(self, url: str, **kwargs: Any) -> Any: ...
    def request(self, method: str, url: str, **kwargs: Any) -> Any: ...


@dataclass
class Attempt:
    """One authorize request: what the client keeps (verifier, state) and the reply."""

    verifier: str
    state: str
    response: Response


class SmartClient:
    def __init__(
        self, http: HttpClient, *, iss: str, redirect_uri: str, client_id: str = "cxr-app"
    ) -> None:
        self.http = http
        self.iss = iss
        self.redirect_uri = redirect_uri
        self.client_id = client_id
        self._config: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            resp = self.http.get(f"{self.iss}/.well-known/smart-configuration")
            assert resp.status_code == 200, resp.text
            self._config = resp.json()
        return self._config

    def ehr_launch(self, patient: str | None) -> dict[str, str]:
        """What the EHR's launch link sends the app: ``iss`` and ``launch``. Without a
        patient: the user-level (worklist) launch."""
        params = {} if patient is None else {"patient": patient}
        resp = self.http.get("/launch/ehr", params=params)
        assert resp.status_code == 303, resp.text
        return query_of(resp.headers["location"])

    def authorize(
        self,
        *,
        scope: str,
        launch: str | None = None,
        state: str | None = None,
        verifier: str | None = None,
        **overrides: str | None,
    ) -> Attempt:
        verifier = verifier or new_verifier()
        state = state if state is not None else secrets.token_urlsafe(16)
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": scope,
            "state": state,
            "aud": self.iss,
            "code_challenge": challenge_for(verifier),
            "code_challenge_method": "S256",
            "launch": launch,
            **overrides,
        }
        sent = {k: v for k, v in params.items() if v is not None}
        resp = self.http.get(self.config["authorization_endpoint"], params=sent)
        return Attempt(verifier, state, resp)

    def pick(self, picker: Response, patient: str, action: str | None = None) -> Response:
        assert picker.status_code == 200, picker.text
        m = re.search(r"name='request' value='([^']+)'", picker.text)
        assert m, "the picker page carries its pending request id"
        form = {"request": m.group(1), "patient": patient}
        if action:
            form["action"] = action
        return self.http.post("/auth/authorize/select", data=form)

    def redirected(self, resp: Response) -> dict[str, str]:
        """The parameters of a redirect back to the app (asserting it goes there)."""
        assert resp.status_code in (302, 303), resp.text
        location = resp.headers["location"]
        assert location.startswith(self.redirect_uri + "?"), location
        return query_of(location)

    def exchange(self, code: str, verifier: str | None, **overrides: str | None) -> Response:
        form: dict[str, str | None] = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "client_id": self.client_id,
            "code_verifier": verifier,
            **overrides,
        }
        return self.http.post(
            self.config["token_endpoint"], data={k: v for k, v in form.items() if v is not None}
        )

    def refresh(self, refresh_token: str, scope: str | None = None) -> Response:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.client_id,
        }
        if scope is not None:
            form["scope"] = scope
        return self.http.post(self.config["token_endpoint"], data=form)

    def ehr_launch_token(self, patient: str | None, scope: str = EHR_SCOPES) -> dict[str, Any]:
        """The whole EHR launch: launch link → authorize → callback → token."""
        launched = self.ehr_launch(patient)
        assert launched["iss"] == self.iss
        attempt = self.authorize(scope=scope, launch=launched["launch"])
        back = self.redirected(attempt.response)
        assert back["state"] == attempt.state
        resp = self.exchange(back["code"], attempt.verifier)
        assert resp.status_code == 200, resp.text
        token: dict[str, Any] = resp.json()
        return token

    def user_launch_token(self, scope: str = BOTH_SCOPES) -> dict[str, Any]:
        """An EHR launch with no patient in context (the clinician's worklist)."""
        return self.ehr_launch_token(None, scope)

    def standalone_token(self, patient: str, scope: str = STANDALONE_SCOPES) -> dict[str, Any]:
        attempt = self.authorize(scope=scope)
        back = self.redirected(self.pick(attempt.response, patient))
        assert back["state"] == attempt.state
        resp = self.exchange(back["code"], attempt.verifier)
        assert resp.status_code == 200, resp.text
        token: dict[str, Any] = resp.json()
        return token

    def fhir(self, path: str, token: str | None, **kwargs: Any) -> Response:
        headers = {"Accept": "application/fhir+json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        method = kwargs.pop("method", "GET")
        return self.http.request(method, f"{self.iss}/{path}", headers=headers, **kwargs)
