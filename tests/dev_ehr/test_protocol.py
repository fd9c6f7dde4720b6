"""SMART App Launch 2.x against the dev EHR, the test playing the app: EHR and standalone
launch with PKCE, and every refusal the spec asks for (state, PKCE, codes, redirect URIs,
refresh rotation, scopes)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet

from fhir_service.dev_ehr import build_ehr, create_app
from fhir_service.settings import Settings
from tests.dev_ehr.conftest import APP, DEV_EHR, FakeClock, FakeHapi
from tests.dev_ehr.smart_client import (
    BOTH_SCOPES,
    EHR_SCOPES,
    STANDALONE_SCOPES,
    USER_RESOURCE_SCOPES,
    SmartClient,
    query_of,
)


def test_discovery_document(smart: SmartClient) -> None:
    cfg = smart.config
    assert cfg["issuer"] == DEV_EHR
    assert cfg["authorization_endpoint"] == f"{DEV_EHR}/auth/authorize"
    assert cfg["token_endpoint"] == f"{DEV_EHR}/auth/token"
    assert cfg["code_challenge_methods_supported"] == ["S256"]
    assert {"authorization_code", "refresh_token"} <= set(cfg["grant_types_supported"])
    for capability in (
        "launch-ehr",
        "launch-standalone",
        "context-ehr-patient",
        "context-standalone-patient",
        "permission-v2",
        "permission-user",
        "sso-openid-connect",
    ):
        assert capability in cfg["capabilities"]
    jwks = smart.http.get(cfg["jwks_uri"]).json()
    assert [k["kty"] for k in jwks["keys"]] == ["RSA"]
    assert all("d" not in k for k in jwks["keys"]), "the JWKS never carries the private key"


def test_ehr_launch_with_pkce(smart: SmartClient) -> None:
    launched = smart.ehr_launch("p1")
    assert launched["iss"] == f"{DEV_EHR}/fhir"
    attempt = smart.authorize(scope=EHR_SCOPES, launch=launched["launch"], nonce="n-123")
    back = smart.redirected(attempt.response)
    assert back["state"] == attempt.state
    resp = smart.exchange(back["code"], attempt.verifier)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    token = resp.json()
    assert token["token_type"] == "Bearer"
    assert token["patient"] == "p1"
    assert token["expires_in"] > 0
    assert set(token["scope"].split()) <= set(EHR_SCOPES.split())
    assert "launch" in token["scope"].split()
    assert token["refresh_token"]

    # Access token: an RS256 JWT verifiable with the published JWKS.
    keys = KeySet.import_key_set(smart.http.get(smart.config["jwks_uri"]).json())
    access = jwt.decode(token["access_token"], keys, algorithms=["RS256"])
    assert access.header["typ"] == "at+jwt"
    assert access.claims["patient"] == "p1"
    assert access.claims["aud"] == f"{DEV_EHR}/fhir"
    # id_token: for openid + fhirUser, audience the client, our nonce back.
    ident = jwt.decode(token["id_token"], keys, algorithms=["RS256"])
    assert ident.claims["aud"] == "cxr-app"
    assert ident.claims["nonce"] == "n-123"
    assert ident.claims["fhirUser"].startswith(f"{DEV_EHR}/fhir/Practitioner/")

    patient = smart.fhir("Patient/p1", token["access_token"])
    assert patient.status_code == 200 and patient.json()["id"] == "p1"
    studies = smart.fhir("ImagingStudy", token["access_token"]).json()
    assert [e["resource"]["id"] for e in studies["entry"]] == ["study-p1"]
    # HAPI's URLs are rewritten to the proxy's, so following them stays behind the proxy.
    assert studies["entry"][0]["fullUrl"] == f"{DEV_EHR}/fhir/ImagingStudy/study-p1"


def test_standalone_launch_with_patient_picker(smart: SmartClient) -> None:
    attempt = smart.authorize(scope=STANDALONE_SCOPES)
    picker = attempt.response
    assert picker.status_code == 200
    assert "DEVELOPMENT TOOL" in picker.text
    assert "Alpha" in picker.text and "Beta" in picker.text
    back = smart.redirected(smart.pick(picker, "p2"))
    assert back["state"] == attempt.state
    token = smart.exchange(back["code"], attempt.verifier).json()
    assert token["patient"] == "p2"
    assert "launch" not in token["scope"].split(), "no launch scope without an EHR launch"
    assert "launch/patient" in token["scope"].split()
    assert smart.fhir("Patient/p2", token["access_token"]).status_code == 200


def test_picker_deny_returns_access_denied_with_state(smart: SmartClient) -> None:
    attempt = smart.authorize(scope=STANDALONE_SCOPES)
    back = smart.redirected(smart.pick(attempt.response, "", action="deny"))
    assert back["error"] == "access_denied"
    assert back["state"] == attempt.state


def test_picker_refuses_unknown_patient(smart: SmartClient) -> None:
    attempt = smart.authorize(scope=STANDALONE_SCOPES)
    assert smart.pick(attempt.response, "no-such-patient").status_code == 400


def test_state_round_trips_unchanged(smart: SmartClient) -> None:
    odd = "a b/c?d=e&f+g%h~ü"
    launch = smart.ehr_launch("p1")["launch"]
    attempt = smart.authorize(scope=EHR_SCOPES, launch=launch, state=odd)
    back = smart.redirected(attempt.response)
    assert back["state"] == odd
    # A client holding another state sees the mismatch: the server never alters it.
    assert back["state"] != "the state the client expected"


def test_authorize_without_state_is_refused(smart: SmartClient) -> None:
    launch = smart.ehr_launch("p1")["launch"]
    back = smart.redirected(smart.authorize(scope=EHR_SCOPES, launch=launch, state="").response)
    assert back["error"] == "invalid_request"
    assert "code" not in back


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"aud": "http://elsewhere.test/fhir"}, "invalid_request"),
        ({"aud": None}, "invalid_request"),
        ({"scope": "user/*.cruds system/*.rs"}, "invalid_scope"),
    ],
)
def test_authorize_refusals_redirect_with_error_and_state(
    smart: SmartClient, overrides: dict[str, str | None], error: str
) -> None:
    launch = smart.ehr_launch("p1")["launch"]
    params: dict[str, str | None] = {"scope": EHR_SCOPES, **overrides}
    scope = params.pop("scope") or ""
    attempt = smart.authorize(scope=scope, launch=launch, **params)
    back = smart.redirected(attempt.response)
    assert back["error"] == error, back
    assert back["state"] == attempt.state
    assert "code" not in back


def test_plain_pkce_refused_even_when_challenge_equals_verifier(smart: SmartClient) -> None:
    verifier = "v" * 43
    attempt = smart.authorize(
        scope=STANDALONE_SCOPES, code_challenge=verifier, code_challenge_method="plain"
    )
    assert smart.redirected(attempt.response)["error"] == "invalid_request"


def test_unknown_launch_is_refused(smart: SmartClient) -> None:
    back = smart.redirected(smart.authorize(scope=EHR_SCOPES, launch="forged").response)
    assert back["error"] == "invalid_request"


def test_expired_launch_is_refused(smart: SmartClient, clock: FakeClock) -> None:
    launch = smart.ehr_launch("p1")["launch"]
    clock.advance(301)
    back = smart.redirected(smart.authorize(scope=EHR_SCOPES, launch=launch).response)
    assert back["error"] == "invalid_request"


@pytest.mark.parametrize(
    "params",
    [
        {"client_id": "stranger"},
        {"redirect_uri": "http://evil.test/callback"},
        {"redirect_uri": f"{APP}/app/callback/../steal"},
        {"redirect_uri": None},
    ],
)
def test_unregistered_client_or_redirect_gets_an_error_page_not_a_redirect(
    smart: SmartClient, params: dict[str, str | None]
) -> None:
    resp = smart.authorize(scope=STANDALONE_SCOPES, **params).response
    assert resp.status_code == 400
    assert "location" not in resp.headers


def _code(smart: SmartClient, patient: str = "p1") -> tuple[str, str]:
    launch = smart.ehr_launch(patient)["launch"]
    attempt = smart.authorize(scope=EHR_SCOPES, launch=launch)
    return smart.redirected(attempt.response)["code"], attempt.verifier


def _error(resp: Any) -> str:
    assert resp.status_code in (400, 401), resp.text
    error: str = resp.json()["error"]
    return error


def test_missing_code_verifier_is_invalid_grant(smart: SmartClient) -> None:
    code, _ = _code(smart)
    assert _error(smart.exchange(code, None)) == "invalid_grant"


def test_wrong_code_verifier_is_invalid_grant_and_leaves_the_code_to_its_client(
    smart: SmartClient,
) -> None:
    """Issue 13: a refused redemption used to burn the code, so anyone who saw a code could
    deny it to the real client with one wrong verifier. Only a successful one uses it up
    (guessing a verifier means inverting SHA-256 over 43+ random characters)."""
    code, verifier = _code(smart)
    assert _error(smart.exchange(code, "x" * 64)) == "invalid_grant"
    assert _error(smart.exchange(code, None)) == "invalid_grant"
    assert _error(smart.exchange(code, verifier, redirect_uri=f"{APP}/other")) == "invalid_grant"
    token = smart.exchange(code, verifier)
    assert token.status_code == 200, token.text
    assert smart.fhir("Patient/p1", token.json()["access_token"]).status_code == 200


def test_expired_code_is_invalid_grant(smart: SmartClient, clock: FakeClock) -> None:
    code, verifier = _code(smart)
    clock.advance(61)
    assert _error(smart.exchange(code, verifier)) == "invalid_grant"


def test_code_just_before_expiry_is_accepted(smart: SmartClient, clock: FakeClock) -> None:
    code, verifier = _code(smart)
    clock.advance(59)
    assert smart.exchange(code, verifier).status_code == 200


def test_reused_code_is_invalid_grant_and_revokes_its_tokens(smart: SmartClient) -> None:
    code, verifier = _code(smart)
    first = smart.exchange(code, verifier)
    assert first.status_code == 200
    assert smart.fhir("Patient/p1", first.json()["access_token"]).status_code == 200
    assert _error(smart.exchange(code, verifier)) == "invalid_grant"
    # RFC 6749 §4.1.2: a replayed code revokes what it issued.
    assert smart.fhir("Patient/p1", first.json()["access_token"]).status_code == 401
    assert _error(smart.refresh(first.json()["refresh_token"])) == "invalid_grant"


def test_code_bound_to_redirect_uri_and_client(smart: SmartClient) -> None:
    code, verifier = _code(smart)
    assert _error(smart.exchange(code, verifier, redirect_uri=f"{APP}/other")) == "invalid_grant"
    code, verifier = _code(smart)
    assert _error(smart.exchange(code, verifier, client_id="stranger")) == "invalid_client"


def test_unknown_code_and_grant_type(smart: SmartClient) -> None:
    assert _error(smart.exchange("made-up", "v" * 43)) == "invalid_grant"
    assert _error(smart.exchange("x", "v" * 43, grant_type="password")) == "unsupported_grant_type"


def test_token_endpoint_needs_a_form(dev_ehr: TestClient) -> None:
    resp = dev_ehr.post("/auth/token", json={"grant_type": "authorization_code"})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"


def test_refresh_rotates_and_old_refresh_token_is_rejected(smart: SmartClient) -> None:
    first = smart.ehr_launch_token("p1")
    resp = smart.refresh(first["refresh_token"])
    assert resp.status_code == 200, resp.text
    second = resp.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["patient"] == "p1"
    assert second["scope"] == first["scope"]
    assert smart.fhir("Patient/p1", second["access_token"]).status_code == 200
    # The rotated-out token is dead; replaying it revokes the grant (token theft signal).
    assert _error(smart.refresh(first["refresh_token"])) == "invalid_grant"
    assert _error(smart.refresh(second["refresh_token"])) == "invalid_grant"
    assert smart.fhir("Patient/p1", second["access_token"]).status_code == 401


def test_refresh_may_narrow_but_not_widen_scope(smart: SmartClient) -> None:
    first = smart.ehr_launch_token("p1")
    narrowed = smart.refresh(first["refresh_token"], scope="online_access patient/Patient.rs")
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["scope"] == "online_access patient/Patient.rs"
    token = narrowed.json()["access_token"]
    assert smart.fhir("ImagingStudy", token).status_code == 403
    widened = smart.refresh(narrowed.json()["refresh_token"], scope="patient/*.cruds")
    assert _error(widened) == "invalid_scope"


def test_a_refused_refresh_keeps_the_refresh_token_and_the_grant(smart: SmartClient) -> None:
    """Issue 13: a refresh asking for a wider scope was refused but burnt the refresh token
    and revoked the grant."""
    first = smart.ehr_launch_token("p1")
    assert _error(smart.refresh(first["refresh_token"], scope="patient/*.cruds")) == (
        "invalid_scope"
    )
    assert smart.fhir("Patient/p1", first["access_token"]).status_code == 200
    again = smart.refresh(first["refresh_token"])
    assert again.status_code == 200, again.text
    assert smart.fhir("Patient/p1", again.json()["access_token"]).status_code == 200
    # A replay of the now used token still revokes the grant.
    assert _error(smart.refresh(first["refresh_token"])) == "invalid_grant"
    assert smart.fhir("Patient/p1", again.json()["access_token"]).status_code == 401


def test_expired_refresh_token_is_invalid_grant(smart: SmartClient, clock: FakeClock) -> None:
    first = smart.ehr_launch_token("p1")
    clock.advance(86_401)
    assert _error(smart.refresh(first["refresh_token"])) == "invalid_grant"


def test_granted_scopes_are_a_subset_of_requested_and_allowed(smart: SmartClient) -> None:
    requested = (
        "launch openid fhirUser patient/ImagingStudy.rs patient/Observation.cruds "
        "patient/Device.rs user/*.rs system/*.rs patient/Observation.rs?category=imaging "
        "patient/Media.read made-up"
    )
    token = smart.ehr_launch_token("p1", scope=requested)
    granted = token["scope"].split()
    assert set(granted) <= set(requested.split())
    assert granted == [
        "launch",
        "openid",
        "fhirUser",
        "patient/ImagingStudy.rs",
        "patient/Media.read",
    ]
    assert "refresh_token" not in token, "no refresh token without offline/online access"


def test_no_id_token_without_openid(smart: SmartClient) -> None:
    token = smart.ehr_launch_token("p1", scope="launch patient/Patient.rs")
    assert "id_token" not in token


def test_authorize_by_post_form(smart: SmartClient) -> None:
    from tests.dev_ehr.smart_client import challenge_for, new_verifier

    verifier = new_verifier()
    launch = smart.ehr_launch("p1")["launch"]
    resp = smart.http.post(
        "/auth/authorize",
        data={
            "response_type": "code",
            "client_id": "cxr-app",
            "redirect_uri": smart.redirect_uri,
            "scope": EHR_SCOPES,
            "state": "s1",
            "aud": smart.iss,
            "code_challenge": challenge_for(verifier),
            "code_challenge_method": "S256",
            "launch": launch,
        },
    )
    assert resp.status_code == 303
    back = query_of(resp.headers["location"])
    assert back["state"] == "s1"
    assert smart.exchange(back["code"], verifier).status_code == 200


def test_launcher_lists_patients_and_labels_itself(dev_ehr: TestClient) -> None:
    page = dev_ehr.get("/launch")
    assert page.status_code == 200
    assert "DEVELOPMENT TOOL — not for production" in page.text
    assert "/launch/ehr?patient=p1" in page.text and "/launch/ehr?patient=p2" in page.text
    only = dev_ehr.get("/launch", params={"patient": "p2"})
    assert "patient=p2" in only.text and "patient=p1" not in only.text
    assert dev_ehr.get("/launch/ehr", params={"patient": "nobody"}).status_code == 404
    launched = dev_ehr.get("/launch/ehr", params={"patient": "p1"})
    assert launched.headers["location"].startswith(f"{APP}/app/launch?iss=")


def test_tokens_survive_a_restart(
    ehr_settings: Settings, fake_hapi: FakeHapi, clock: FakeClock
) -> None:
    def started() -> TestClient:
        ehr = build_ehr(
            ehr_settings, upstream_transport=httpx.MockTransport(fake_hapi), clock=clock
        )
        client = TestClient(create_app(ehr_settings, ehr=ehr), base_url=DEV_EHR)
        client.follow_redirects = False
        return client

    with started() as before:
        token = SmartClient(before, iss=f"{DEV_EHR}/fhir", redirect_uri=f"{APP}/app/callback")
        issued = token.ehr_launch_token("p1")
    with started() as after:
        smart = SmartClient(after, iss=f"{DEV_EHR}/fhir", redirect_uri=f"{APP}/app/callback")
        assert smart.fhir("Patient/p1", issued["access_token"]).status_code == 200
        assert smart.refresh(issued["refresh_token"]).status_code == 200


def test_user_level_ehr_launch_grants_user_scopes_and_no_patient(smart: SmartClient) -> None:
    launcher = smart.http.get("/launch")
    assert "href='/launch/ehr'" in launcher.text, "the launcher offers the worklist launch"
    launched = smart.ehr_launch(None)
    assert launched["iss"] == f"{DEV_EHR}/fhir"
    attempt = smart.authorize(scope=BOTH_SCOPES, launch=launched["launch"])
    back = smart.redirected(attempt.response)  # a code straight away: no patient picker
    resp = smart.exchange(back["code"], attempt.verifier)
    assert resp.status_code == 200, resp.text
    token = resp.json()
    assert "patient" not in token and "need_patient_banner" not in token
    granted = token["scope"].split()
    assert granted == [
        "launch",
        "openid",
        "fhirUser",
        "online_access",
        *USER_RESOURCE_SCOPES.split(),
    ]
    keys = KeySet.import_key_set(smart.http.get(smart.config["jwks_uri"]).json())
    access = jwt.decode(token["access_token"], keys, algorithms=["RS256"])
    assert "patient" not in access.claims
    assert access.claims["sub"] == "Practitioner/cxr-dev-radiologist"

    # A refresh keeps the user context: still no patient, the same user/ scopes.
    refreshed = smart.refresh(token["refresh_token"]).json()
    assert "patient" not in refreshed
    assert refreshed["scope"].split() == granted


def test_user_level_launch_grants_only_read_search_user_scopes(smart: SmartClient) -> None:
    requested = (
        "launch launch/patient openid user/ImagingStudy.rs user/Observation.cruds "
        "user/Observation.read patient/Media.rs user/Device.rs user/*.rs system/*.rs "
        "user/Task.rs?status=failed user/Media.write"
    )
    token = smart.user_launch_token(scope=requested)
    assert token["scope"].split() == [
        "launch",
        "openid",
        "user/ImagingStudy.rs",
        "user/Observation.read",
    ]
    assert "patient" not in token


def test_patient_launch_with_both_scope_kinds_grants_patient_scopes_only(
    smart: SmartClient,
) -> None:
    token = smart.ehr_launch_token("p1", scope=BOTH_SCOPES)
    assert token["patient"] == "p1"
    granted = token["scope"].split()
    assert not [s for s in granted if s.startswith("user/")]
    assert granted == EHR_SCOPES.split()


def test_standalone_launch_without_launch_patient_is_user_level(smart: SmartClient) -> None:
    attempt = smart.authorize(scope=f"openid fhirUser {USER_RESOURCE_SCOPES}")
    back = smart.redirected(attempt.response)  # no picker
    token = smart.exchange(back["code"], attempt.verifier).json()
    assert "patient" not in token
    assert token["scope"].split() == ["openid", "fhirUser", *USER_RESOURCE_SCOPES.split()]
    # Asking for a patient still means the picker, and patient/ scopes only.
    picker = smart.authorize(scope=f"{STANDALONE_SCOPES} {USER_RESOURCE_SCOPES}").response
    assert picker.status_code == 200 and "Choose a patient" in picker.text
