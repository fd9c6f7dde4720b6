"""Signing key persistence and the scope algebra, without HTTP."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fhir_service.dev_ehr import scopes
from fhir_service.dev_ehr.tokens import InvalidTokenError, TokenService, load_or_create_key
from fhir_service.settings import CXR_APP_SCOPES


def _service(path: Path, now: float = 1000.0) -> TokenService:
    return TokenService(
        load_or_create_key(path), issuer="http://i", fhir_base="http://i/fhir", clock=lambda: now
    )


def test_key_is_generated_private_and_kept_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "dev-ehr" / "signing-key.pem"
    first = _service(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = first.access_token(
        subject="u",
        client_id="c",
        scopes=["patient/Patient.rs"],
        patient="p",
        family="f",
        lifetime_s=60,
    )
    restarted = _service(path)
    assert restarted.jwks() == first.jwks()
    claims = restarted.verify_access_token(token)
    assert (claims.patient, claims.scopes, claims.family) == ("p", ["patient/Patient.rs"], "f")
    assert list(tmp_path.glob("dev-ehr/.*")) == [], "no temporary key file left behind"


def test_token_checks_issuer_audience_and_expiry(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    svc = _service(path)
    token = svc.access_token(
        subject="u", client_id="c", scopes=[], patient=None, family="f", lifetime_s=60
    )
    with pytest.raises(InvalidTokenError):
        _service(path, now=1060.0).verify_access_token(token)
    other = TokenService(
        load_or_create_key(path), issuer="http://i", fhir_base="http://j/fhir", clock=lambda: 1000
    )
    with pytest.raises(InvalidTokenError):
        other.verify_access_token(token)


@pytest.mark.parametrize(
    ("requested", "launch", "granted"),
    [
        ("patient/Observation.rs", False, ["patient/Observation.rs"]),
        (
            "patient/Observation.r patient/Observation.s",
            False,
            ["patient/Observation.r", "patient/Observation.s"],
        ),
        ("patient/Observation.read", False, ["patient/Observation.read"]),
        ("patient/Observation.write patient/Observation.cruds", False, []),
        ("patient/*.rs", False, []),  # the client may only have named types
        ("user/Observation.rs system/Observation.rs", False, []),
        ("patient/Observation.rs?category=imaging", False, []),
        ("patient/Observation.sr", False, []),  # v2 permissions are in cruds order
        ("launch launch/patient", False, ["launch/patient"]),
        ("launch launch/patient", True, ["launch", "launch/patient"]),
        ("openid fhirUser openid", False, ["openid", "fhirUser"]),
        ("", False, []),
    ],
)
def test_grant_is_subset_of_requested_and_allowed(
    requested: str, launch: bool, granted: list[str]
) -> None:
    got = scopes.grant(requested, CXR_APP_SCOPES, ehr_launch=launch)
    assert got == granted
    assert set(got) <= set(requested.split())


def test_wildcard_client_and_permits() -> None:
    got = scopes.grant("patient/*.rs patient/Media.r", "patient/*.rs", ehr_launch=False)
    assert got == ["patient/*.rs", "patient/Media.r"]
    assert scopes.permits(["patient/*.rs"], "Observation", "s")
    assert not scopes.permits(["patient/*.rs"], "Observation", "c")
    assert not scopes.permits(["user/*.rs"], "Observation", "r")
    assert scopes.permits(["patient/Observation.read"], "Observation", "s")
