"""Who may call ``$similar`` (``fhir_service.api.auth``): the service key, or a SMART access
token of a trusted issuer checked against its JWKS or by introspection; and what each sees.

The issuer is an ``httpx.MockTransport`` serving OpenID discovery, a JWKS and an
introspection endpoint; tokens are minted here with joserfc and a test RSA key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from joserfc import jws, jwt
from joserfc.jwk import KeySet, RSAKey

from cxr_errors import ForbiddenError, UnauthorizedError
from fhir_service.api.auth import Caller, SimilarAuth, caller_from_claims
from fhir_service.settings import Settings, TrustedIssuer

T = TypeVar("T")
ISS = "https://ehr.test"
AUD = "https://ehr.test/fhir"
OPAQUE_ISS = "https://opaque.test"
KEY_SERVICE = "k" * 40
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})


@pytest.fixture(scope="module")
def other_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})


class Issuer:
    def __init__(self, key: RSAKey) -> None:
        self.key = key
        self.requests: list[httpx.Request] = []
        self.active: dict[str, dict[str, Any]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        if url == f"{ISS}/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": ISS, "jwks_uri": f"{ISS}/jwks"})
        if url == f"{ISS}/jwks":
            return httpx.Response(200, json=KeySet([self.key]).as_dict(private=False))
        if url == f"{OPAQUE_ISS}/introspect":
            assert request.headers["authorization"].startswith("Basic ")
            token = dict(x.split("=", 1) for x in request.content.decode().split("&"))["token"]
            return httpx.Response(200, json=self.active.get(token, {"active": False}))
        return httpx.Response(404)


def _settings() -> Settings:
    return Settings(
        service_api_key=KEY_SERVICE,
        similar_issuers=[
            TrustedIssuer(issuer=ISS, audience=AUD),
            TrustedIssuer(
                issuer=OPAQUE_ISS,
                audience=f"{OPAQUE_ISS}/fhir",
                introspection_endpoint=f"{OPAQUE_ISS}/introspect",
                introspection_client_id="cxr",
                introspection_client_secret="secret",
            ),
        ],
    )


def _claims(**extra: Any) -> dict[str, Any]:
    claims = {
        "iss": ISS,
        "aud": AUD,
        "sub": "dr-1",
        "exp": NOW + 600,
        "iat": NOW,
        "scope": "launch patient/ImagingStudy.rs patient/Patient.rs",
        "patient": "p1",
    }
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(key: RSAKey, claims: dict[str, Any], **header: Any) -> str:
    return jwt.encode({"alg": "RS256", "kid": "k1", "typ": "at+jwt", **header}, claims, key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(key: RSAKey, claims: dict[str, Any]) -> str:
    """An HS256 JWT whose HMAC secret is the issuer's public key PEM, signed by hand (JOSE
    libraries refuse to do it)."""
    header = _b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(key.as_pem(private=False), signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{_b64(mac.digest())}"


def run(issuer: Issuer, call: Callable[[SimilarAuth], Coroutine[Any, Any, T]]) -> T:
    async def go() -> T:
        auth = SimilarAuth(_settings(), transport=httpx.MockTransport(issuer), clock=lambda: NOW)
        try:
            return await call(auth)
        finally:
            await auth.aclose()

    return asyncio.run(go())


def caller(issuer: Issuer, authorization: str | None) -> Caller:
    return run(issuer, lambda auth: auth.caller(authorization))


# --- accepted ----------------------------------------------------------------------------------


def test_the_service_key_is_a_system_caller(key: RSAKey) -> None:
    assert caller(Issuer(key), f"Bearer {KEY_SERVICE}") == Caller("service", "the service key")


def test_a_patient_token_is_bound_to_its_patient(key: RSAKey) -> None:
    issuer = Issuer(key)
    who = caller(issuer, f"Bearer {_sign(key, _claims())}")
    assert (who.kind, who.patient) == ("patient", "p1")
    # Keys found through OpenID discovery.
    assert [str(r.url) for r in issuer.requests] == [
        f"{ISS}/.well-known/openid-configuration",
        f"{ISS}/jwks",
    ]


def test_user_and_system_tokens_see_every_patient(key: RSAKey) -> None:
    user = _claims(patient=None, scope="user/ImagingStudy.rs")
    assert caller(Issuer(key), f"Bearer {_sign(key, user)}").kind == "user"
    v1 = _claims(patient=None, scope="system/*.read")
    assert caller(Issuer(key), f"bearer {_sign(key, v1)}") == Caller("system", f"dr-1 from {ISS}")


def test_keys_are_fetched_once_and_again_for_a_new_kid(key: RSAKey) -> None:
    issuer = Issuer(key)

    async def twice(auth: SimilarAuth) -> None:
        for _ in range(3):
            await auth.caller(f"Bearer {_sign(key, _claims())}")

    run(issuer, twice)
    assert len([r for r in issuer.requests if r.url.path == "/jwks"]) == 1


def test_a_new_key_right_after_a_fetch_is_fetched_but_made_up_kids_are_rate_limited(
    key: RSAKey, other_key: RSAKey
) -> None:
    """An issuer that restarts with a new key (or rotates) seconds after we cached its old
    one: the first token with the new kid fetches the keys again at once; a stream of
    made-up kids fetches at most once per ``_JWKS_MIN_REFETCH_S``."""
    issuer = Issuer(key)
    rotated = RSAKey.import_key(other_key.as_dict(private=True) | {"kid": "k2"})

    async def rotate(auth: SimilarAuth) -> None:
        await auth.caller(f"Bearer {_sign(key, _claims())}")
        issuer.key = rotated
        await auth.caller(f"Bearer {_sign(rotated, _claims(), kid='k2')}")
        for i in range(5):
            with pytest.raises(UnauthorizedError):
                await auth.caller(f"Bearer {_sign(rotated, _claims(), kid=f'made-up-{i}')}")

    run(issuer, rotate)
    # The first fetch, the one for k2; the made-up kids within 30 s of it fetch nothing.
    assert len([r for r in issuer.requests if r.url.path == "/jwks"]) == 2


def test_an_active_introspected_token(key: RSAKey) -> None:
    issuer = Issuer(key)
    issuer.active["opaque-1"] = {
        "active": True,
        "scope": "patient/ImagingStudy.read",
        "patient": "p7",
        "exp": NOW + 60,
        "iss": OPAQUE_ISS,
    }
    who = caller(issuer, "Bearer opaque-1")
    assert (who.kind, who.patient) == ("patient", "p7")


# --- refused: token misuse -----------------------------------------------------------------------


def _assert_401(issuer: Issuer, authorization: str | None, match: str | None = None) -> None:
    with pytest.raises(UnauthorizedError, match=match):
        caller(issuer, authorization)


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer  ", "Basic dXNlcjpwYXNz", f"Token {KEY_SERVICE}"]
)
def test_no_bearer_token_is_401(key: RSAKey, authorization: str | None) -> None:
    _assert_401(Issuer(key), authorization)


def test_a_wrong_service_key_is_401(key: RSAKey) -> None:
    _assert_401(Issuer(key), f"Bearer {KEY_SERVICE}x")


def test_alg_none_is_refused(key: RSAKey) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    token = f"{header}.{_b64(json.dumps(_claims()).encode())}."
    _assert_401(Issuer(key), f"Bearer {token}", "algorithm 'none'")


def test_hs256_signed_with_the_public_key_is_refused(key: RSAKey) -> None:
    """The classic confusion: the RSA public key (which anyone can fetch) used as an HMAC
    secret."""
    assert hs256_with_public_key(key, _claims()).count(".") == 2
    _assert_401(Issuer(key), f"Bearer {hs256_with_public_key(key, _claims())}", "HS256")


def test_a_token_signed_by_another_key_is_refused(key: RSAKey, other_key: RSAKey) -> None:
    _assert_401(Issuer(key), f"Bearer {_sign(other_key, _claims())}", "not valid")


def test_a_tampered_payload_is_refused(key: RSAKey) -> None:
    header, _, signature = _sign(key, _claims()).split(".")
    forged = _b64(json.dumps(_claims(patient="p2")).encode())
    _assert_401(Issuer(key), f"Bearer {header}.{forged}.{signature}", "not valid")


@pytest.mark.parametrize(
    ("claims", "match"),
    [
        (_claims(aud="https://other.test/fhir"), "aud"),
        (_claims(aud=None), "aud"),
        (_claims(exp=NOW - 31), "exp"),
        (_claims(exp=None), "exp"),
        (_claims(nbf=NOW + 600), "not yet valid"),
        (_claims(iss="https://evil.test"), "not one this service trusts"),
        (_claims(iss=None), "not one this service trusts"),
    ],
    ids=["wrong-aud", "no-aud", "expired", "no-exp", "not-yet", "wrong-iss", "no-iss"],
)
def test_wrong_claims_are_refused(key: RSAKey, claims: dict[str, Any], match: str) -> None:
    _assert_401(Issuer(key), f"Bearer {_sign(key, claims)}", match)


def test_a_jws_that_is_not_json_claims_is_refused(key: RSAKey) -> None:
    token = jws.serialize_compact({"alg": "RS256", "kid": "k1"}, b"not json", key)
    _assert_401(Issuer(key), f"Bearer {token}")


@pytest.mark.parametrize(
    "body",
    [
        {"active": False},
        {"active": "true", "scope": "patient/ImagingStudy.rs", "patient": "p1"},
        {"active": True, "scope": "user/ImagingStudy.rs", "exp": NOW - 60},
        {"active": True, "scope": "user/ImagingStudy.rs", "iss": "https://evil.test"},
        {"active": True, "scope": "user/ImagingStudy.rs", "aud": "https://other.test/fhir"},
    ],
)
def test_an_introspected_token_that_is_not_good_is_refused(
    key: RSAKey, body: dict[str, Any]
) -> None:
    issuer = Issuer(key)
    issuer.active["opaque-2"] = body
    _assert_401(issuer, "Bearer opaque-2")


def test_an_issuer_that_is_down_means_401_not_500(key: RSAKey) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def go() -> None:
        auth = SimilarAuth(_settings(), transport=httpx.MockTransport(down), clock=lambda: NOW)
        try:
            with pytest.raises(UnauthorizedError, match="unavailable"):
                await auth.caller(f"Bearer {_sign(key, _claims())}")
        finally:
            await auth.aclose()

    asyncio.run(go())


# --- refused: not enough scope -----------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        _claims(scope="patient/Patient.rs"),
        _claims(scope="patient/ImagingStudy.r"),
        _claims(scope="user/ImagingStudy.rs"),  # a patient token is judged by patient/ scopes
        _claims(patient=None, scope="patient/ImagingStudy.rs"),  # patient scopes, no patient
        _claims(patient=None, scope="user/ImagingStudy.rs?status=available"),
        _claims(patient=None, scope=""),
    ],
)
def test_tokens_without_imagingstudy_read_and_search_are_403(
    key: RSAKey, claims: dict[str, Any]
) -> None:
    with pytest.raises(ForbiddenError):
        caller(Issuer(key), f"Bearer {_sign(key, claims)}")


def test_scope_may_be_a_list_claim() -> None:
    who = caller_from_claims({"scp": ["user/ImagingStudy.rs"], "sub": "u"}, ISS)
    assert who.kind == "user"
    with pytest.raises(UnauthorizedError):
        caller_from_claims({"scope": "patient/*.rs", "patient": "../p1"}, ISS)
