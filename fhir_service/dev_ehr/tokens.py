"""The dev EHR's signing key and its JWTs (joserfc): RS256 access tokens and OpenID id_tokens.

The RSA key is generated on first start and kept in ``{data_dir}/dev-ehr/signing-key.pem``
(mode 0600, git-ignored with the rest of the data dir), so a restart keeps issued tokens
valid. Access tokens follow RFC 9068 (``typ: at+jwt``, ``aud`` = the FHIR base, ``scope``,
``client_id``) plus SMART's ``patient``; the proxy refuses an id_token (``typ: JWT``,
``aud`` = the client) presented as an access token.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeyParameters, KeySet, RSAKey
from joserfc.jwt import JWTClaimsRegistry

ALGORITHM = "RS256"
ACCESS_TOKEN_TYP = "at+jwt"
_KEY_PARAMETERS: KeyParameters = {"use": "sig", "alg": ALGORITHM}


class InvalidTokenError(Exception):
    """The bearer token is not one this dev EHR issued, or no longer valid."""


def load_or_create_key(path: Path) -> RSAKey:
    """The signing key at ``path``, generated there (0600) if it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = RSAKey.generate_key(2048, parameters=_KEY_PARAMETERS, private=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.as_pem(private=True))
        try:
            # link() fails if another process won the race: then both use the winner's key.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = RSAKey.import_key(path.read_bytes(), parameters=_KEY_PARAMETERS)
    key.ensure_kid()
    return key


@dataclass(frozen=True)
class AccessClaims:
    subject: str
    client_id: str
    scopes: list[str]
    patient: str | None
    family: str | None
    expires_at: int


class TokenService:
    def __init__(
        self, key: RSAKey, *, issuer: str, fhir_base: str, clock: Callable[[], float]
    ) -> None:
        self._key = key
        self._keys = KeySet([key])
        self.issuer = issuer
        self.fhir_base = fhir_base
        self._clock = clock

    def jwks(self) -> dict[str, Any]:
        return dict(self._keys.as_dict(private=False))

    def _sign(self, typ: str, claims: dict[str, Any]) -> str:
        header = {"alg": ALGORITHM, "kid": self._key.kid, "typ": typ}
        return jwt.encode(header, claims, self._key, algorithms=[ALGORITHM])

    def access_token(
        self,
        *,
        subject: str,
        client_id: str,
        scopes: list[str],
        patient: str | None,
        family: str,
        lifetime_s: int,
    ) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.fhir_base,
            "client_id": client_id,
            "scope": " ".join(scopes),
            "iat": now,
            "exp": now + lifetime_s,
            "jti": secrets.token_urlsafe(16),
            # The grant family: revoked when a code or refresh token is replayed.
            "grant": family,
        }
        if patient is not None:
            claims["patient"] = patient
        return self._sign(ACCESS_TOKEN_TYP, claims)

    def id_token(
        self,
        *,
        subject: str,
        client_id: str,
        fhir_user: str | None,
        nonce: str | None,
        lifetime_s: int,
    ) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": client_id,
            "iat": now,
            "exp": now + lifetime_s,
            "auth_time": now,
        }
        if fhir_user is not None:
            claims["fhirUser"] = fhir_user
        if nonce is not None:
            claims["nonce"] = nonce
        return self._sign("JWT", claims)

    def verify_access_token(self, token: str) -> AccessClaims:
        try:
            decoded = jwt.decode(token, self._keys, algorithms=[ALGORITHM])
        except (JoseError, ValueError) as exc:
            raise InvalidTokenError("the token is not a JWT signed by this dev EHR") from exc
        if decoded.header.get("typ") != ACCESS_TOKEN_TYP:
            raise InvalidTokenError("not an access token")
        registry = JWTClaimsRegistry(
            now=lambda: int(self._clock()),
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.fhir_base},
            exp={"essential": True},
            sub={"essential": True},
            client_id={"essential": True},
            scope={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise InvalidTokenError(f"the token is not valid here: {exc.description}") from exc
        c = decoded.claims
        return AccessClaims(
            subject=str(c["sub"]),
            client_id=str(c["client_id"]),
            scopes=str(c["scope"]).split(),
            patient=str(c["patient"]) if c.get("patient") is not None else None,
            family=str(c["grant"]) if c.get("grant") is not None else None,
            expires_at=int(c["exp"]),
        )
