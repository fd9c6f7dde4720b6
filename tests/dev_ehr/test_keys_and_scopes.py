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


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        ("user/Observation.rs", ["user/Observation.rs"]),
        ("user/Observation.read", ["user/Observation.read"]),  # v1 read = r + s
        ("user/Observation.r user/Observation.s", ["user/Observation.r", "user/Observation.s"]),
        ("user/Observation.cruds user/Observation.write user/Observation.*", []),
        ("user/Observation.rs?category=imaging", []),
        ("user/*.rs user/Device.rs", []),  # the client may only have its named types
        ("patient/Observation.rs system/Observation.rs", []),  # no patient in context
        ("launch launch/patient openid fhirUser", ["launch", "openid", "fhirUser"]),
    ],
)
def test_user_context_grants_only_read_search_user_scopes(
    requested: str, granted: list[str]
) -> None:
    got = scopes.grant(requested, CXR_APP_SCOPES, ehr_launch=True, context="user")
    assert got == granted
    assert set(got) <= set(requested.split())


def test_user_scopes_need_user_scopes_allowed_and_never_write() -> None:
    assert scopes.grant("user/Media.rs", "patient/Media.rs", ehr_launch=True, context="user") == []
    assert scopes.grant("user/Media.cud", "user/*.cruds", ehr_launch=True, context="user") == []
    assert scopes.grant("user/Media.rs", "user/*.cruds", ehr_launch=True, context="user") == [
        "user/Media.rs"
    ]
    # With a patient in context nothing changes: patient/ scopes only.
    both = "patient/Media.rs user/Media.rs"
    assert scopes.grant(both, CXR_APP_SCOPES, ehr_launch=True, context="patient") == [
        "patient/Media.rs"
    ]


@pytest.mark.parametrize(
    ("requested", "ehr_launch", "patient", "context"),
    [
        ("launch patient/Media.rs user/Media.rs", True, "p1", "patient"),
        ("launch patient/Media.rs user/Media.rs", True, None, "user"),
        ("launch/patient user/Media.rs", False, None, "patient"),  # the picker chooses one
        ("patient/Media.rs user/Media.rs", False, None, "patient"),
        ("openid user/Media.rs", False, None, "user"),
        ("openid", False, None, "user"),
        # patient/ scopes the client may not have do not ask for a patient
        ("patient/Device.rs user/Media.rs", False, None, "user"),
    ],
)
def test_launch_context(
    requested: str, ehr_launch: bool, patient: str | None, context: scopes.Context
) -> None:
    got = scopes.launch_context(
        requested, CXR_APP_SCOPES, ehr_launch=ehr_launch, launch_patient=patient
    )
    assert got == context


def test_permits_judges_each_context_by_its_own_scopes() -> None:
    user = ["user/Observation.rs", "patient/Media.rs"]
    assert scopes.permits(user, "Observation", "r", context="user")
    assert not scopes.permits(user, "Observation", "r", context="patient")
    assert not scopes.permits(user, "Media", "r", context="user")
    assert scopes.permits(user, "Media", "s", context="patient")
    assert scopes.permits(["user/Observation.read"], "Observation", "s", context="user")
    assert not scopes.permits(["user/Observation.rs"], "Observation", "u", context="user")
