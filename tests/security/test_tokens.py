"""Token misuse against the running servers: the dev EHR's FHIR proxy and the service's
``$similar`` (directly and through HAPI's forwarder) refuse ``alg: none``, HS256 "signed"
with the issuer's public key, a token for another audience or from another issuer (even
signed with the right key), an expired one; and a replayed code revokes what it issued.

Tokens with wrong claims are signed here with the dev EHR's own key (read from its data dir),
so the claims, not the signature, are what is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from fhir_service.dev_ehr.app import SIGNING_KEY_FILE
from fhir_service.settings import Settings
from tests.dev_ehr.smart_client import SmartClient
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def good(smart: SmartClient, stack: Stack) -> dict[str, Any]:
    """A real patient launch's token claims, for a patient with a study."""
    study = stack.post_study(0)
    patient = str(stack.fhir.read("ImagingStudy", study)["subject"]["reference"]).split("/")[-1]
    token = smart.ehr_launch_token(patient)["access_token"]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return {"token": token, "claims": claims, "patient": patient}


def _key(dev_ehr: Settings) -> RSAKey:
    key = RSAKey.import_key((dev_ehr.dev_ehr_dir / SIGNING_KEY_FILE).read_bytes())
    key.ensure_kid()
    return key


def _resign(dev_ehr: Settings, claims: dict[str, Any]) -> str:
    key = _key(dev_ehr)
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, claims, key)


def _forgeries(dev_ehr: Settings, claims: dict[str, Any]) -> dict[str, str]:
    header = {"alg": "HS256", "typ": "at+jwt", "kid": _key(dev_ehr).kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    public_pem = _key(dev_ehr).as_pem(private=False)
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    unsigned = _b64(json.dumps({"alg": "none", "typ": "at+jwt"}).encode())
    none = f"{unsigned}.{signing_input.split('.')[1]}."
    now = int(time.time())
    return {
        "alg-none": none,
        "hs256-with-public-key": f"{signing_input}.{_b64(mac)}",
        "wrong-aud": _resign(dev_ehr, {**claims, "aud": "http://127.0.0.1:1/fhir"}),
        "wrong-iss": _resign(dev_ehr, {**claims, "iss": "http://127.0.0.1:1"}),
        "expired": _resign(dev_ehr, {**claims, "iat": now - 7200, "exp": now - 3600}),
    }


def _callers(stack: Stack, smart: SmartClient) -> dict[str, Callable[[str], Any]]:
    def similar(base: str) -> Callable[[str], httpx.Response]:
        return lambda token: httpx.get(
            f"{base}/ImagingStudy/$similar",
            params={"text": "effusion"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

    return {
        "dev EHR proxy": lambda token: smart.fhir("ImagingStudy", token),
        "service $similar": similar(f"{stack.settings.service_url}/fhir"),
        "HAPI $similar": similar(stack.settings.fhir_base_url),
    }


def test_misused_tokens_are_refused_everywhere(
    stack: Stack, smart: SmartClient, dev_ehr: Settings, good: dict[str, Any]
) -> None:
    callers = _callers(stack, smart)
    for where, call in callers.items():
        control = call(good["token"])
        assert control.status_code == 200, (where, control.text)
    for name, token in _forgeries(dev_ehr, good["claims"]).items():
        for where, call in callers.items():
            answer = call(token)
            assert answer.status_code == 401, (name, where, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer")


def test_a_replayed_code_revokes_its_tokens(smart: SmartClient, good: dict[str, Any]) -> None:
    launch = smart.ehr_launch(good["patient"])["launch"]
    attempt = smart.authorize(scope="launch patient/ImagingStudy.rs", launch=launch)
    code = smart.redirected(attempt.response)["code"]
    first = smart.exchange(code, attempt.verifier)
    assert first.status_code == 200
    token = first.json()["access_token"]
    assert smart.fhir("ImagingStudy", token).status_code == 200
    replay = smart.exchange(code, attempt.verifier)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert smart.fhir("ImagingStudy", token).status_code == 401
