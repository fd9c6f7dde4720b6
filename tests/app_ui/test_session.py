"""The SMART app's sessions: the signed cookie, the store, and the one-shot pending launch.

The pending-launch rules (state checked once, verifier sent once, launch lifetime) live in the
``/app/callback`` route; they are driven here in process through FastAPI's TestClient, with
the EHR (discovery and token endpoint) as an ``httpx.MockTransport`` and a fake clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_service.app_ui import routes, smart
from fhir_service.app_ui.service import AppUi
from fhir_service.app_ui.session import COOKIE, AppSession, SessionStore, Tokens
from fhir_service.settings import Settings

SECRET = "unit-test-session-secret-0123456789abcdef"
T0 = 1_750_000_000.0
ISS = "http://ehr.test/fhir"
AUTHORIZE = "http://ehr.test/auth/authorize"
TOKEN = "http://ehr.test/auth/token"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _hs256(header: Any, claims: Any, secret: str = SECRET) -> str:
    """A JWT signed by hand, so the tests do not trust the library they check."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _store(clock: Clock, secret: str = SECRET, lifetime_s: int = 3600) -> SessionStore:
    return SessionStore(secret, lifetime_s=lifetime_s, clock=clock)


# --- the cookie ---------------------------------------------------------------------------------


def test_cookie_round_trip() -> None:
    clock = Clock()
    store = _store(clock)
    session = store.new()
    other = store.new()
    assert session.sid != other.sid
    assert len(session.sid) >= 43  # 32 random bytes
    assert session.expires_at == T0 + 3600
    value = store.cookie_value(session)
    assert store.from_cookie(value) is session
    assert store.from_cookie(store.cookie_value(other)) is other

    # The cookie is a JWS naming only the session id and expiry: no token, no state.
    header, payload, _ = value.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")).get("alg") == "HS256"
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    assert claims == {"sid": session.sid, "exp": int(T0 + 3600)}


def test_a_cookie_signed_by_hand_with_the_secret_is_accepted() -> None:
    store = _store(Clock())
    session = store.new()
    cookie = _hs256({"alg": "HS256", "typ": "JWT"}, {"sid": session.sid, "exp": int(T0) + 60})
    assert store.from_cookie(cookie) is session


def test_a_tampered_cookie_is_rejected() -> None:
    store = _store(Clock())
    victim, attacker = store.new(), store.new()
    good = store.cookie_value(attacker)
    header, payload, sig = good.split(".")
    # Swap in the victim's session id but keep the attacker's signature.
    forged_claims = _b64(json.dumps({"sid": victim.sid, "exp": int(T0) + 3600}).encode())
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    for bad in (
        f"{header}.{forged_claims}.{sig}",
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}.",
        f"{header}.{payload}",
        good[:-4],
        good + "x",
        "",
        None,
        "garbage",
        "a.b.c",
    ):
        assert store.from_cookie(bad) is None, bad
    assert store.from_cookie(good) is attacker


def test_a_cookie_of_another_secret_or_algorithm_is_rejected() -> None:
    clock = Clock()
    store = _store(clock)
    session = store.new()
    claims = {"sid": session.sid, "exp": int(T0) + 3600}
    foreign = _store(clock, secret="another-deployment-secret-0123456789abcd")
    assert foreign.from_cookie(store.cookie_value(session)) is None
    assert store.from_cookie(_hs256({"alg": "HS256"}, claims, secret="not-the-secret")) is None
    body = _b64(json.dumps(claims).encode())
    unsigned = f"{_b64(json.dumps({'alg': 'none'}).encode())}.{body}."
    assert store.from_cookie(unsigned) is None
    hs512_input = f"{_b64(json.dumps({'alg': 'HS512'}).encode())}.{body}"
    hs512 = hmac.new(SECRET.encode(), hs512_input.encode(), hashlib.sha512).digest()
    assert store.from_cookie(f"{hs512_input}.{_b64(hs512)}") is None


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(T0) + 60},  # no sid
        {"sid": "SID"},  # no exp
        {"sid": "SID", "exp": "later"},
        {"sid": "SID", "exp": int(T0) + 60, "nbf": int(T0) + 30},
        ["SID"],
        "SID",
    ],
)
def test_a_validly_signed_cookie_with_bad_claims_is_rejected(claims: Any) -> None:
    store = _store(Clock())
    session = store.new()
    if isinstance(claims, dict) and claims.get("sid") == "SID":
        claims["sid"] = session.sid
    assert store.from_cookie(_hs256({"alg": "HS256"}, claims)) is None


def test_an_expired_cookie_or_session_is_rejected() -> None:
    clock = Clock()
    store = _store(clock, lifetime_s=600)
    session = store.new()
    cookie = store.cookie_value(session)
    clock.now = T0 + 599
    assert store.from_cookie(cookie) is session
    clock.now = T0 + 601
    assert store.from_cookie(cookie) is None

    # A long-lived cookie cannot keep an expired session alive.
    long_lived = _hs256({"alg": "HS256"}, {"sid": session.sid, "exp": int(T0) + 86400})
    assert store.from_cookie(long_lived) is None
    # ... and an expired cookie cannot revive a live session.
    clock.now = T0
    stale = _hs256({"alg": "HS256"}, {"sid": session.sid, "exp": int(T0) - 10})
    assert store.from_cookie(stale) is None
    assert store.from_cookie(cookie) is session


def test_expired_sessions_are_purged_when_a_new_one_starts() -> None:
    clock = Clock()
    store = _store(clock, lifetime_s=600)
    old = store.new()
    clock.now = T0 + 500
    younger = store.new()
    clock.now = T0 + 700
    store.new()
    # A cookie signed far into the future still finds nothing: the old session is gone.
    forever = _hs256({"alg": "HS256"}, {"sid": old.sid, "exp": int(T0) + 10**6})
    # Step the clock back to when the old session was alive: only purging explains a miss.
    clock.now = T0 + 550
    assert store.from_cookie(forever) is None
    assert store.from_cookie(store.cookie_value(younger)) is younger


def test_a_dropped_session_or_a_restart_signs_out() -> None:
    clock = Clock()
    store = _store(clock)
    session = store.new()
    cookie = store.cookie_value(session)
    store.drop(session)
    assert store.from_cookie(cookie) is None
    store.drop(session)  # twice is harmless

    kept = store.new()
    restarted = _store(clock)  # same secret, empty memory
    assert restarted.from_cookie(store.cookie_value(kept)) is None


# --- the pending launch (the /app/launch → /app/callback round trip) --------------------------


class FakeEhr:
    """SMART discovery and the token endpoint of an EHR, as a MockTransport handler."""

    def __init__(self) -> None:
        self.token_forms: list[dict[str, str]] = []
        self.challenges: list[str] = []
        self.patient: str | None = "p1"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url == f"{ISS}/.well-known/smart-configuration":
            return httpx.Response(
                200,
                json={
                    "authorization_endpoint": AUTHORIZE,
                    "token_endpoint": TOKEN,
                    "code_challenge_methods_supported": ["S256"],
                    "capabilities": ["launch-ehr", "client-public", "context-ehr-patient"],
                },
            )
        if url == TOKEN and request.method == "POST":
            form = dict(parse_qsl(request.content.decode()))
            self.token_forms.append(form)
            if form.get("code") != "the-code" or (
                smart.s256_challenge(form.get("code_verifier", "")) not in self.challenges
            ):
                return httpx.Response(400, json={"error": "invalid_grant"})
            body: dict[str, Any] = {
                "access_token": "at-1",
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": "openid fhirUser patient/ImagingStudy.rs",
                "refresh_token": "rt-1",
            }
            if self.patient:
                body["patient"] = self.patient
            return httpx.Response(200, json=body)
        return httpx.Response(404)


class Answer(Protocol):
    """What the tests read of a TestClient response (starlette's own httpx flavour)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


class App:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.ehr = FakeEhr()
        settings = Settings(
            data_dir=tmp_path,
            model_weights="untrained",
            clip_weights="untrained",
            app_issuers=[ISS],
        )
        self.ui = AppUi(settings, transport=httpx.MockTransport(self.ehr), clock=self.clock)
        app = FastAPI()
        app.include_router(routes.router)
        app.state.app_ui = self.ui  # the lifespan is not run: no real HTTP client
        self.client = TestClient(app, follow_redirects=False)

    def launch(self) -> str:
        """Start an EHR launch; the state the authorization server would send back."""
        resp = self.client.get("/app/launch", params={"iss": ISS, "launch": "lx-1"})
        assert resp.status_code == 303, resp.text
        query = parse_qs(urlsplit(resp.headers["location"]).query)
        self.ehr.challenges.append(query["code_challenge"][0])
        return query["state"][0]

    def callback(self, **params: str) -> Answer:
        return self.client.get("/app/callback", params=params)

    def session(self) -> AppSession | None:
        return self.ui.sessions.from_cookie(self.client.cookies.get(COOKIE))


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App(tmp_path)


def test_the_callback_exchanges_the_code_once(app: App) -> None:
    state = app.launch()
    session = app.session()
    assert session is not None and session.pending is not None
    assert session.pending.iss == ISS
    assert session.pending.token_endpoint == TOKEN
    assert session.tokens is None

    resp = app.callback(code="the-code", state=state)
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == "/app/"
    [form] = app.ehr.token_forms
    assert form["grant_type"] == "authorization_code"
    assert form["redirect_uri"] == app.ui.redirect_uri
    assert form["client_id"] == app.ui.settings.app_client_id
    assert smart.s256_challenge(form["code_verifier"]) == app.ehr.challenges[0]
    assert session.pending is None
    assert session.iss == ISS and session.token_endpoint == TOKEN
    assert isinstance(session.tokens, Tokens)
    assert (session.tokens.access_token, session.tokens.patient) == ("at-1", "p1")
    assert session.tokens.refresh_token == "rt-1"
    assert session.tokens.expires_at == T0 + 3600

    # Replaying the same redirect does nothing: the pending launch is gone.
    replay = app.callback(code="the-code", state=state)
    assert replay.status_code == 400
    assert "no launch in progress" in replay.text
    assert len(app.ehr.token_forms) == 1


def test_a_wrong_state_consumes_the_pending_launch(app: App) -> None:
    state = app.launch()
    resp = app.callback(code="the-code", state=state + "x")
    assert resp.status_code == 400
    assert "state" in resp.text
    # One guess only: the right state afterwards is refused as well.
    resp = app.callback(code="the-code", state=state)
    assert resp.status_code == 400
    assert app.ehr.token_forms == []
    session = app.session()
    assert session is not None and session.tokens is None


def test_a_missing_state_is_refused(app: App) -> None:
    app.launch()
    assert app.callback(code="the-code").status_code == 400
    assert app.ehr.token_forms == []


def test_a_pending_launch_expires(app: App) -> None:
    state = app.launch()
    app.clock.now = T0 + routes._PENDING_LIFETIME_S + 1
    resp = app.callback(code="the-code", state=state)
    assert resp.status_code == 400
    assert "too long" in resp.text
    assert app.ehr.token_forms == []
    session = app.session()
    assert session is not None and session.pending is None and session.tokens is None


def test_a_new_launch_replaces_the_session(app: App) -> None:
    first_state = app.launch()
    first = app.session()
    second_state = app.launch()
    second = app.session()
    assert first is not None and second is not None and first is not second
    assert first_state != second_state
    assert app.ui.sessions.from_cookie(app.ui.sessions.cookie_value(first)) is None
    assert first.pending is not None and second.pending is not None
    assert first.pending.verifier != second.pending.verifier
    assert app.callback(code="the-code", state=second_state).status_code == 303
    assert second.tokens is not None and first.tokens is None


def test_a_denied_authorization_or_no_patient_signs_nobody_in(app: App) -> None:
    state = app.launch()
    resp = app.callback(state=state, error="access_denied", error_description="user said no")
    assert resp.status_code == 403
    assert "user said no" in resp.text
    assert app.ehr.token_forms == []

    app.ehr.patient = None
    state = app.launch()
    resp = app.callback(code="the-code", state=state)
    assert resp.status_code == 400
    assert "patient" in resp.text
    session = app.session()
    assert session is not None and session.tokens is None


def test_a_refused_code_exchange_is_shown_and_signs_nobody_in(app: App) -> None:
    state = app.launch()
    resp = app.callback(code="a-stolen-code", state=state)
    assert resp.status_code == 502
    assert "invalid_grant" in resp.text
    session = app.session()
    assert session is not None and session.tokens is None
