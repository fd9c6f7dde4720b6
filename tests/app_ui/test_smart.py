"""SMART App Launch client side (PKCE, discovery, token endpoint) and AppUi's token handling.

No network: every EHR is an ``httpx.MockTransport`` handler, time is a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest

from cxr_errors import FhirError
from fhir_service.app_ui import smart
from fhir_service.app_ui.service import AppUi, NotSignedIn
from fhir_service.app_ui.session import AppSession, Tokens
from fhir_service.settings import Settings

T = TypeVar("T")
Handler = Callable[[httpx.Request], httpx.Response]

T0 = 1_750_000_000.0
ISS = "http://ehr.test/fhir"
AUTHORIZE = "http://ehr.test/auth/authorize"
TOKEN = "http://ehr.test/auth/token"
CONFIG: dict[str, Any] = {
    "issuer": "http://ehr.test",
    "authorization_endpoint": AUTHORIZE,
    "token_endpoint": TOKEN,
    "code_challenge_methods_supported": ["S256"],
    "grant_types_supported": ["authorization_code", "refresh_token"],
    "capabilities": ["launch-ehr", "launch-standalone", "client-public", "context-ehr-patient"],
}
# RFC 7636 Appendix B: 32 random octets, their base64url (the verifier), the SHA-256 of the
# verifier, and its base64url (the challenge).
RFC7636_OCTETS = bytes(
    [116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186,
     22, 212, 37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121]
)  # fmt: skip
RFC7636_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC7636_DIGEST = bytes(
    [19, 211, 30, 150, 26, 26, 216, 236, 47, 22, 177, 12, 76, 152, 46, 8,
     118, 168, 120, 173, 109, 241, 68, 86, 110, 225, 137, 74, 203, 112, 249, 195]
)  # fmt: skip
RFC7636_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _with_client(handler: Handler, call: Callable[[httpx.AsyncClient], Any]) -> Any:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        return await call(http)


def _discover(handler: Handler, iss: str = ISS) -> dict[str, Any]:
    result: dict[str, Any] = run(_with_client(handler, lambda http: smart.discover(http, iss)))
    return result


def _token(handler: Handler, clock: Clock | None = None) -> dict[str, Any]:
    """The code exchange of ``CODE_FORM`` against ``handler``."""
    result: dict[str, Any] = run(
        _with_client(
            handler,
            lambda http: smart.exchange_code(
                http,
                TOKEN,
                client_id=CODE_FORM["client_id"],
                redirect_uri=CODE_FORM["redirect_uri"],
                code=CODE_FORM["code"],
                verifier=CODE_FORM["code_verifier"],
                clock=clock or Clock(),
            ),
        )
    )
    return result


def _refresh(handler: Handler, refresh_token: str, clock: Clock | None = None) -> dict[str, Any]:
    result: dict[str, Any] = run(
        _with_client(
            handler,
            lambda http: smart.refresh(
                http,
                TOKEN,
                client_id="cxr-app",
                refresh_token=refresh_token,
                clock=clock or Clock(),
            ),
        )
    )
    return result


# --- PKCE ---------------------------------------------------------------------------------------


def test_s256_challenge_matches_rfc7636_appendix_b() -> None:
    # The vector is self-consistent (so a typo in it cannot pass unnoticed)...
    assert base64.urlsafe_b64encode(RFC7636_OCTETS).rstrip(b"=").decode() == RFC7636_VERIFIER
    assert hashlib.sha256(RFC7636_VERIFIER.encode()).digest() == RFC7636_DIGEST
    assert base64.urlsafe_b64encode(RFC7636_DIGEST).rstrip(b"=").decode() == RFC7636_CHALLENGE
    # ... and the app computes the RFC's challenge.
    assert smart.s256_challenge(RFC7636_VERIFIER) == RFC7636_CHALLENGE


def test_s256_challenge_is_unpadded_base64url() -> None:
    for verifier in (smart.new_verifier() for _ in range(20)):
        challenge = smart.s256_challenge(verifier)
        assert len(challenge) == 43  # 32 bytes, no padding
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge)


def test_s256_challenge_is_what_the_authorization_url_carries() -> None:
    verifier = smart.new_verifier()
    _, q = _authorize(verifier=verifier)
    assert q["code_challenge"] == smart.s256_challenge(verifier)
    assert q["code_challenge"] == (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )


def test_new_verifier_is_long_random_and_unreserved() -> None:
    verifiers = {smart.new_verifier() for _ in range(50)}
    assert len(verifiers) == 50
    for v in verifiers:
        # RFC 7636 §4.1: 43..128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
        assert 43 <= len(v) <= 128
        assert re.fullmatch(r"[A-Za-z0-9\-._~]+", v), v


# --- the authorization URL ----------------------------------------------------------------------


def _authorize(config: dict[str, Any] = CONFIG, **kwargs: Any) -> tuple[str, dict[str, str]]:
    args: dict[str, Any] = {
        "client_id": "cxr-app",
        "redirect_uri": "http://127.0.0.1:10001/app/callback",
        "iss": ISS,
        "state": "st-123",
        "verifier": RFC7636_VERIFIER,
        "launch": None,
    }
    args.update(kwargs)
    url = smart.authorize_url(config, **args)
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in query.values()), f"repeated parameter in {url}"
    return parts._replace(query="").geturl(), {k: v[0] for k, v in query.items()}


def test_authorize_url_of_an_ehr_launch() -> None:
    endpoint, q = _authorize(launch="opaque launch/ctx+1")
    assert endpoint == AUTHORIZE
    assert q["response_type"] == "code"
    assert q["client_id"] == "cxr-app"
    assert q["redirect_uri"] == "http://127.0.0.1:10001/app/callback"
    assert q["state"] == "st-123"
    assert q["aud"] == ISS
    assert q["code_challenge"] == RFC7636_CHALLENGE
    assert q["code_challenge_method"] == "S256"
    assert q["launch"] == "opaque launch/ctx+1"
    assert q["scope"].strip()
    assert "code_verifier" not in q
    assert RFC7636_VERIFIER not in endpoint + str(q)


def test_authorize_url_of_a_standalone_launch_has_no_launch_parameter() -> None:
    for launch in (None, ""):
        _, q = _authorize(launch=launch)
        assert "launch" not in q
        assert q["code_challenge_method"] == "S256"
        assert q["code_challenge"] == RFC7636_CHALLENGE
        assert q["aud"] == ISS
        assert q["scope"].strip()


def test_authorize_url_always_uses_pkce() -> None:
    with pytest.raises(ValueError, match="PKCE"):
        _authorize(verifier="")


def test_authorize_url_keeps_the_endpoint_query() -> None:
    config = {**CONFIG, "authorization_endpoint": f"{AUTHORIZE}?tenant=north"}
    endpoint, q = _authorize(config, launch="lx")
    assert endpoint == AUTHORIZE
    assert q["tenant"] == "north"
    assert q["state"] == "st-123"
    assert q["launch"] == "lx"


# --- discovery ----------------------------------------------------------------------------------


def test_discover_reads_the_well_known_smart_configuration() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=CONFIG)

    assert _discover(handler, ISS + "/") == CONFIG
    assert [str(r.url) for r in seen] == [f"{ISS}/.well-known/smart-configuration"]
    assert seen[0].method == "GET"
    assert seen[0].headers["accept"] == "application/json"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({k: v for k, v in CONFIG.items() if k != "token_endpoint"}, "token_endpoint"),
        (
            {k: v for k, v in CONFIG.items() if k != "authorization_endpoint"},
            "authorization_endpoint",
        ),
        ({**CONFIG, "token_endpoint": ["http://ehr.test/token"]}, "token_endpoint"),
        ({**CONFIG, "code_challenge_methods_supported": ["plain"]}, "S256"),
        ({**CONFIG, "code_challenge_methods_supported": []}, "S256"),
        ({k: v for k, v in CONFIG.items() if k != "code_challenge_methods_supported"}, "S256"),
    ],
)
def test_discover_refuses_an_incomplete_configuration(config: dict[str, Any], message: str) -> None:
    with pytest.raises(smart.LaunchError, match=message):
        _discover(lambda _: httpx.Response(200, json=config))


@pytest.mark.parametrize("status", [301, 401, 404, 500, 503])
def test_discover_refuses_a_non_200_answer(status: int) -> None:
    with pytest.raises(smart.LaunchError, match=str(status)):
        _discover(lambda _: httpx.Response(status, json=CONFIG))


def test_discover_maps_a_network_error_to_a_launch_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(smart.LaunchError, match="cannot reach"):
        _discover(handler)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>Sign in to the proxy</html>"),
        httpx.Response(200, json=["authorization_endpoint", "token_endpoint"]),
    ],
    ids=["html", "json-list"],
)
def test_discover_refuses_an_answer_that_is_not_a_json_object(response: httpx.Response) -> None:
    with pytest.raises(smart.LaunchError):
        _discover(lambda _: response)


# --- the token endpoint -------------------------------------------------------------------------

CODE_FORM = {
    "grant_type": "authorization_code",
    "code": "c-1",
    "redirect_uri": "http://127.0.0.1:10001/app/callback",
    "client_id": "cxr-app",
    "code_verifier": RFC7636_VERIFIER,
}


BEARER = {"access_token": "a", "token_type": "Bearer"}


def _form(request: httpx.Request) -> list[tuple[str, str]]:
    return parse_qsl(request.content.decode(), keep_blank_values=True, strict_parsing=True)


def test_the_code_exchange_posts_the_form_and_adds_expires_at() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "access_token": "at-1",
                "token_type": "Bearer",
                "expires_in": 3600,
                "refresh_token": "rt-1",
                "patient": "p1",
            },
        )

    body = _token(handler, Clock(T0))
    assert body["access_token"] == "at-1"
    assert body["patient"] == "p1"
    assert body["refresh_token"] == "rt-1"
    assert body["expires_at"] == T0 + 3600  # our clock, not the wall clock
    [request] = seen
    assert (request.method, str(request.url)) == ("POST", TOKEN)
    assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert request.headers["accept"] == "application/json"
    form = _form(request)
    assert len(form) == len(dict(form)), f"repeated parameter in {form}"
    assert dict(form) == CODE_FORM
    # A public client: no client secret goes anywhere.
    assert "authorization" not in request.headers
    assert "client_secret" not in dict(form)


def test_the_refresh_posts_the_form_and_takes_the_rotated_refresh_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "access_token": "at-2",
                "token_type": "bearer",
                "expires_in": 600,
                "refresh_token": "rt-2",
            },
        )

    body = _refresh(handler, "rt-1", Clock(T0 + 50))
    assert (body["access_token"], body["refresh_token"]) == ("at-2", "rt-2")
    assert body["expires_at"] == T0 + 50 + 600
    [request] = seen
    assert (request.method, str(request.url)) == ("POST", TOKEN)
    assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert "authorization" not in request.headers
    form = _form(request)
    assert len(form) == len(dict(form)), f"repeated parameter in {form}"
    # No scope: the refresh asks for what was granted.
    assert dict(form) == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-1",
        "client_id": "cxr-app",
    }


def test_a_refresh_answer_without_a_refresh_token_keeps_the_one_sent() -> None:
    answer = {"access_token": "at-2", "token_type": "Bearer", "expires_in": 60}
    body = _refresh(lambda _: httpx.Response(200, json=answer), "rt-1")
    assert (body["access_token"], body["refresh_token"]) == ("at-2", "rt-1")


@pytest.mark.parametrize(
    ("extra", "expires_at"),
    [
        ({"token_type": "bearer", "expires_in": 60}, T0 + 60),
        ({"token_type": "BEARER", "expires_in": "120"}, T0 + 120),
        ({"token_type": "Bearer"}, T0 + 300),  # no expires_in: assume five minutes
        ({"token_type": "Bearer", "expires_in": None}, T0 + 300),
        ({"token_type": "Bearer", "expires_in": 0}, T0),  # already expired: refresh at once
    ],
)
def test_token_expiry(extra: dict[str, Any], expires_at: float) -> None:
    body = _token(lambda _: httpx.Response(200, json={"access_token": "a", **extra}))
    assert body["expires_at"] == expires_at


def test_a_refused_token_request_carries_the_servers_error() -> None:
    # Characters Authlib's own OAuth2Error would refuse in a description (quotes, non-ASCII)
    # still come through.
    description = 'the code has expired ("c-1", 61 s > 60 s) — launch again'
    answer = {"error": "invalid_grant", "error_description": description}
    with pytest.raises(smart.TokenError, match="invalid_grant") as info:
        _token(lambda _: httpx.Response(400, json=answer))
    assert (info.value.error, info.value.error_description) == ("invalid_grant", description)
    assert description in str(info.value)
    assert isinstance(info.value, smart.LaunchError)


def test_a_refused_refresh_carries_the_servers_error() -> None:
    answer = {"error": "invalid_grant", "error_description": "refresh token revoked"}
    with pytest.raises(smart.TokenError, match="invalid_grant: refresh token revoked"):
        _refresh(lambda _: httpx.Response(400, json=answer), "rt-1")


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(502, text="<html>Bad gateway</html>"), "HTTP 502"),
        (httpx.Response(503, json={"error": "temporarily_unavailable"}), "HTTP 503"),
        (httpx.Response(400, text="<html>Bad request</html>"), "HTTP 400"),
        (httpx.Response(200, text="<html>Sign in to the proxy</html>"), "HTTP 200"),
        (httpx.Response(200, json=["access_token"]), "HTTP 200"),
        (httpx.Response(401, json={"error": "invalid_client"}), "invalid_client"),
        # A JSON answer that is no OAuth error is still no grant when it is not a 200...
        (httpx.Response(400, json={"access_token": "a", "token_type": "Bearer"}), "HTTP 400"),
        # ... and a 200 without an access token is no grant either.
        (httpx.Response(200, json={"token_type": "Bearer", "expires_in": 60}), "HTTP 200"),
        # Nor one whose lifetime is no number.
        (httpx.Response(200, json={**BEARER, "expires_in": "soon"}), "HTTP 200"),
        (httpx.Response(200, json={**BEARER, "expires_in": [60]}), "HTTP 200"),
    ],
)
def test_token_request_refusals(response: httpx.Response, message: str) -> None:
    with pytest.raises(smart.TokenError, match=message):
        _token(lambda _: response)


@pytest.mark.parametrize(
    ("answer", "message"),
    [({"access_token": "a", "token_type": "mac"}, "mac"), ({"access_token": "a"}, "token_type")],
)
def test_only_bearer_tokens_are_taken(answer: dict[str, Any], message: str) -> None:
    with pytest.raises(smart.LaunchError, match=message):
        _token(lambda _: httpx.Response(200, json=answer))
    with pytest.raises(smart.LaunchError, match=message):
        _refresh(lambda _: httpx.Response(200, json=answer), "rt-1")


def test_token_request_maps_a_network_error_to_a_launch_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(smart.LaunchError, match="cannot reach the token endpoint"):
        _token(handler)
    with pytest.raises(smart.LaunchError, match="cannot reach the token endpoint"):
        _refresh(handler, "rt-1")


# --- AppUi: the user's tokens and FHIR calls ----------------------------------------------------


class FakeEhr:
    """The EHR's token endpoint (refresh grant) and FHIR base, as one MockTransport handler.

    Access tokens are valid until the EHR forgets them; refresh tokens rotate when
    ``rotate`` is set, and a used refresh token is then no longer valid.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.access_tokens = {"at-1"}
        self.refresh_tokens = {"rt-1"}
        self.rotate = True
        self.token_forms: list[dict[str, str]] = []
        self.fhir_requests: list[httpx.Request] = []
        self.other_requests: list[httpx.Request] = []
        self.resources: dict[str, dict[str, Any]] = {}
        self.refuse_every_token = False
        self._n = 1

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url == TOKEN:
            form = dict(parse_qsl(request.content.decode()))
            self.token_forms.append(form)
            if form.get("grant_type") != "refresh_token" or (
                form.get("refresh_token") not in self.refresh_tokens
            ):
                return httpx.Response(
                    400, json={"error": "invalid_grant", "error_description": "refresh refused"}
                )
            self._n += 1
            self.access_tokens = {f"at-{self._n}"}
            body: dict[str, Any] = {
                "access_token": f"at-{self._n}",
                "token_type": "Bearer",
                "expires_in": 3600,
            }
            if self.rotate:
                self.refresh_tokens = {f"rt-{self._n}"}
                body["refresh_token"] = f"rt-{self._n}"
            return httpx.Response(200, json=body)
        if url == ISS or url.startswith((ISS + "/", ISS + "?")):
            self.fhir_requests.append(request)
            bearer = request.headers.get("authorization", "")
            token = bearer.removeprefix("Bearer ")
            if self.refuse_every_token or token not in self.access_tokens:
                return httpx.Response(401, json={"resourceType": "OperationOutcome"})
            found = self.resources.get(url[len(ISS) :].lstrip("/"))
            if found is None:
                return httpx.Response(404, json={"resourceType": "OperationOutcome"})
            return httpx.Response(200, json=found)
        self.other_requests.append(request)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.ehr = FakeEhr(self.clock)
        self.settings = Settings(
            data_dir=tmp_path, model_weights="untrained", clip_weights="untrained"
        )
        self.ui = AppUi(self.settings, transport=httpx.MockTransport(self.ehr), clock=self.clock)
        self.session = self.signed_in(self.ui.sessions.new())

    def signed_in(self, session: AppSession, **tokens: Any) -> AppSession:
        session.iss = ISS
        session.token_endpoint = TOKEN
        values: dict[str, Any] = {
            "access_token": "at-1",
            "expires_at": T0 + 3600,
            "scope": "openid fhirUser patient/ImagingStudy.rs",
            "patient": "p1",
            "refresh_token": "rt-1",
            "fhir_user": "Practitioner/dr-1",
        }
        values.update(tokens)
        session.tokens = Tokens(**values)
        session.mode = "patient"
        return session

    def run(self, call: Callable[[AppUi], Coroutine[Any, Any, T]]) -> T:
        async def go() -> T:
            try:
                return await call(self.ui)
            finally:
                await self.ui.aclose()

        return asyncio.run(go())


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_a_fresh_token_is_reused(h: Harness) -> None:
    async def twice(ui: AppUi) -> list[str]:
        return [await ui.access_token(h.session), await ui.access_token(h.session)]

    h.clock.now = T0 + 3600 - smart.REFRESH_MARGIN_S - 1
    assert h.run(twice) == ["at-1", "at-1"]
    assert h.ehr.token_forms == []


@pytest.mark.parametrize(
    "now", [T0 + 3600 - smart.REFRESH_MARGIN_S, T0 + 3600, T0 + 7200], ids=["margin", "at", "past"]
)
def test_an_expiring_token_is_refreshed(h: Harness, now: float) -> None:
    h.clock.now = now
    token = h.run(lambda ui: ui.access_token(h.session))
    assert token == "at-2"
    assert h.ehr.token_forms == [
        {"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": "cxr-app"}
    ]
    tokens = h.session.tokens
    assert tokens is not None
    assert tokens.access_token == "at-2"
    assert tokens.expires_at == now + 3600
    assert tokens.refresh_token == "rt-2"  # rotated
    # What the refresh answer does not repeat is kept from the launch.
    assert tokens.patient == "p1"
    assert tokens.fhir_user == "Practitioner/dr-1"
    assert tokens.scope == "openid fhirUser patient/ImagingStudy.rs"


def test_a_refresh_without_a_new_refresh_token_keeps_the_old_one(h: Harness) -> None:
    h.ehr.rotate = False

    async def refresh_twice(ui: AppUi) -> list[str]:
        first = await ui.access_token(h.session)
        h.clock.now += 7200
        return [first, await ui.access_token(h.session)]

    h.clock.now = T0 + 7200
    assert h.run(refresh_twice) == ["at-2", "at-3"]
    assert [f["refresh_token"] for f in h.ehr.token_forms] == ["rt-1", "rt-1"]
    assert h.session.tokens is not None and h.session.tokens.refresh_token == "rt-1"


def test_concurrent_requests_refresh_once(h: Harness) -> None:
    async def together(ui: AppUi) -> list[str]:
        return list(await asyncio.gather(*(ui.access_token(h.session) for _ in range(5))))

    h.clock.now = T0 + 7200
    # With rotation, a second refresh with the used token would be refused and sign out.
    assert h.run(together) == ["at-2"] * 5
    assert len(h.ehr.token_forms) == 1


def test_a_refused_refresh_signs_out(h: Harness) -> None:
    h.ehr.refresh_tokens = set()  # revoked at the EHR
    h.clock.now = T0 + 7200
    with pytest.raises(NotSignedIn, match="invalid_grant"):
        h.run(lambda ui: ui.access_token(h.session))
    assert h.session.tokens is None
    assert len(h.ehr.token_forms) == 1
    # Signed out for good: no further call reaches the EHR.
    with pytest.raises(NotSignedIn):
        h.run(lambda ui: ui.access_token(h.session))
    assert len(h.ehr.token_forms) == 1


def test_an_expired_token_without_refresh_token_is_not_signed_in(h: Harness) -> None:
    h.signed_in(h.session, refresh_token=None)
    h.clock.now = T0 + 7200
    with pytest.raises(NotSignedIn):
        h.run(lambda ui: ui.access_token(h.session))
    assert h.ehr.token_forms == []


def test_no_tokens_is_not_signed_in(h: Harness) -> None:
    bare = h.ui.sessions.new()
    with pytest.raises(NotSignedIn):
        h.run(lambda ui: ui.access_token(bare))
    with pytest.raises(NotSignedIn):
        h.run(lambda ui: ui.fhir(bare, "Patient/p1"))
    assert h.ehr.token_forms == [] and h.ehr.fhir_requests == []


def test_fhir_sends_the_users_bearer_token(h: Harness) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
    h.ehr.resources["Patient/p1"] = patient
    answer = h.run(lambda ui: ui.fhir(h.session, "Patient/p1"))
    assert (answer.status, answer.body) == (200, patient)
    [request] = h.ehr.fhir_requests
    assert str(request.url) == f"{ISS}/Patient/p1"
    assert request.headers["authorization"] == "Bearer at-1"
    assert request.headers["accept"] == "application/fhir+json"
    assert h.ehr.token_forms == []


def test_a_401_triggers_exactly_one_refresh_and_retry(h: Harness) -> None:
    h.ehr.access_tokens = set()  # the EHR revoked the (unexpired) access token
    h.ehr.resources["Patient/p1"] = {"resourceType": "Patient", "id": "p1"}
    answer = h.run(lambda ui: ui.fhir(h.session, "Patient/p1"))
    assert answer.status == 200
    assert [r.headers["authorization"] for r in h.ehr.fhir_requests] == [
        "Bearer at-1",
        "Bearer at-2",
    ]
    assert len(h.ehr.token_forms) == 1
    assert h.session.tokens is not None and h.session.tokens.access_token == "at-2"


def test_a_second_401_signs_out_without_looping(h: Harness) -> None:
    h.ehr.refuse_every_token = True  # e.g. the user's FHIR access was withdrawn
    with pytest.raises(NotSignedIn):
        h.run(lambda ui: ui.fhir(h.session, "Patient/p1"))
    assert [r.headers["authorization"] for r in h.ehr.fhir_requests] == [
        "Bearer at-1",
        "Bearer at-2",
    ]
    assert len(h.ehr.token_forms) == 1
    assert h.session.tokens is None


def test_a_refused_refresh_after_401_signs_out(h: Harness) -> None:
    h.ehr.access_tokens = set()
    h.ehr.refresh_tokens = set()
    with pytest.raises(NotSignedIn, match="invalid_grant"):
        h.run(lambda ui: ui.fhir(h.session, "Patient/p1"))
    assert len(h.ehr.fhir_requests) == 1
    assert len(h.ehr.token_forms) == 1
    assert h.session.tokens is None


def test_fhir_errors_other_than_401_are_answers(h: Harness) -> None:
    answer = h.run(lambda ui: ui.fhir(h.session, "ImagingStudy/unknown"))
    assert answer.status == 404
    assert answer.body == {"resourceType": "OperationOutcome"}
    assert h.ehr.token_forms == []
    assert h.session.tokens is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.test/fhir/Patient?page=2",
        "https://ehr.test/fhir/Patient?page=2",  # another origin: the scheme differs
        "http://ehr.test/fhir-other/Patient?page=2",
        "http://ehr.test/fhirPatient",
        "http://ehr.test.evil.test/fhir/Patient",
        "http://ehr.test/auth/token",
    ],
)
def test_the_token_never_leaves_the_fhir_base(h: Harness, url: str) -> None:
    with pytest.raises(FhirError, match="refusing"):
        h.run(lambda ui: ui.fhir(h.session, url))
    assert h.ehr.fhir_requests == [] and h.ehr.other_requests == [] and h.ehr.token_forms == []


P1 = "Patient/p1"


def _page(ids: list[str], nxt: str | None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": f"{ISS}/ImagingStudy"}],
        "entry": [
            {"resource": {"resourceType": "ImagingStudy", "id": i, "subject": {"reference": P1}}}
            for i in ids
        ],
    }
    if nxt:
        bundle["link"].append({"relation": "next", "url": nxt})
    return bundle


def test_search_follows_next_links_on_the_fhir_base(h: Harness) -> None:
    first = "ImagingStudy?_count=100&_sort=-_lastUpdated&patient=p1"
    h.ehr.resources[first] = _page(["s1", "s2"], f"{ISS}/{first}&page=2")
    h.ehr.resources[f"{first}&page=2"] = _page(["s3"], None)
    found = h.run(lambda ui: ui.search(h.session, "ImagingStudy", {"_sort": "-_lastUpdated"}))
    assert [r["id"] for r in found] == ["s1", "s2", "s3"]
    assert len(h.ehr.fhir_requests) == 2
    assert all(r.headers["authorization"] == "Bearer at-1" for r in h.ehr.fhir_requests)


def test_search_follows_hapis_paging_links_at_the_base(h: Harness) -> None:
    nxt = f"{ISS}?_getpages=abc&_getpagesoffset=100&_count=100&_bundletype=searchset"
    h.ehr.resources["ImagingStudy?_count=100&patient=p1"] = _page(["s1", "s2"], nxt)
    h.ehr.resources[nxt[len(ISS) :]] = _page(["s3"], None)
    found = h.run(lambda ui: ui.search(h.session, "ImagingStudy", {}))
    assert [r["id"] for r in found] == ["s1", "s2", "s3"]


def test_search_refuses_a_next_link_to_another_host(h: Harness) -> None:
    h.ehr.resources["ImagingStudy?_count=100&patient=p1"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "ImagingStudy", "id": "s1"}}],
        "link": [{"relation": "next", "url": "http://evil.test/fhir?_getpages=abc"}],
    }
    with pytest.raises(FhirError, match="refusing"):
        h.run(lambda ui: ui.search(h.session, "ImagingStudy", {}))
    assert len(h.ehr.fhir_requests) == 1
    assert h.ehr.other_requests == []


def test_search_raises_on_a_failed_search(h: Harness) -> None:
    with pytest.raises(FhirError, match="404"):
        h.run(lambda ui: ui.search(h.session, "Task", {"status": "failed"}))
