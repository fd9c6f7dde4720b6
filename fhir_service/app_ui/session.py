"""Server-side sessions of the SMART app.

The browser holds only a signed, http-only cookie naming a random session id (a JWT, HS256,
signed with ``CXR_APP_SESSION_SECRET`` by joserfc). Tokens, the pending authorization
(``state``, PKCE verifier) and the launch context stay in this process's memory and never
reach JavaScript: a script injected into the page cannot read or exfiltrate them.

One process, memory only: a restart signs every user out (they relaunch from the EHR), and
several ``cxr serve`` nodes need sticky sessions or a shared store behind this interface.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from fhir_service.app_ui.smart import Mode

COOKIE = "cxr_app_session"


@dataclass
class Pending:
    """An authorization request in flight: checked and consumed by the callback."""

    state: str
    verifier: str
    iss: str
    token_endpoint: str
    created: float


@dataclass
class Tokens:
    access_token: str
    expires_at: float
    scope: str
    patient: str | None
    refresh_token: str | None = None
    id_token: str | None = None
    fhir_user: str | None = None


@dataclass
class AppSession:
    sid: str
    expires_at: float
    pending: Pending | None = None
    iss: str | None = None
    token_endpoint: str | None = None
    tokens: Tokens | None = None
    #: Set with the first tokens (see :func:`fhir_service.app_ui.smart.launch_mode`).
    mode: Mode | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Sent back in ``X-Cxr-Csrf`` by the pages on every state-changing call.
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    extra: dict[str, Any] = field(default_factory=dict)


class SessionStore:
    def __init__(
        self, secret: str, *, lifetime_s: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = OctKey.import_key(secret)
        self._lifetime_s = lifetime_s
        self._clock = clock
        self._sessions: dict[str, AppSession] = {}

    def new(self) -> AppSession:
        self._expire()
        sid = secrets.token_urlsafe(32)
        session = AppSession(sid=sid, expires_at=self._clock() + self._lifetime_s)
        self._sessions[sid] = session
        return session

    def cookie_value(self, session: AppSession) -> str:
        claims = {"sid": session.sid, "exp": int(session.expires_at)}
        return jwt.encode({"alg": "HS256"}, claims, self._key)

    def from_cookie(self, value: str | None) -> AppSession | None:
        if not value:
            return None
        try:
            token = jwt.decode(value, self._key, algorithms=["HS256"])
            jwt.JWTClaimsRegistry(
                now=int(self._clock()), exp={"essential": True}, sid={"essential": True}
            ).validate(token.claims)
        except (JoseError, ValueError):
            return None
        session = self._sessions.get(str(token.claims["sid"]))
        if session is None or session.expires_at < self._clock():
            return None
        return session

    def drop(self, session: AppSession) -> None:
        self._sessions.pop(session.sid, None)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, v in self._sessions.items() if v.expires_at < now]:
            del self._sessions[sid]
