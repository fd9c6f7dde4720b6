"""Short-lived grants of the dev EHR (launch contexts, pending authorizations, codes, refresh
tokens) in one SQLite file under the data dir, so a restart keeps refresh tokens valid.

Only a SHA-256 of each token is stored. Codes and refresh tokens are single-use: presenting
one a second time revokes its whole grant family (RFC 6749 §4.1.2 and OAuth 2.0 Security BCP
§4.14: a replayed code or refresh token means it leaked), which the FHIR proxy checks for
access tokens too. Only a *successful* redemption uses one up: the token endpoint checks a
request against :meth:`GrantStore.peek` first, so whoever sees a code cannot spend it by
sending a wrong verifier or redirect_uri, and a refused refresh keeps the grant.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    kind TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    family TEXT,
    data TEXT NOT NULL,
    expires_at REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, token_hash)
);
CREATE TABLE IF NOT EXISTS revoked_families (family TEXT PRIMARY KEY, revoked_at REAL NOT NULL);
"""


class Kind(enum.StrEnum):
    LAUNCH = "launch"
    PENDING = "pending"
    CODE = "code"
    REFRESH = "refresh"


class Outcome(enum.Enum):
    OK = "ok"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REUSED = "reused"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Taken:
    outcome: Outcome
    data: dict[str, Any] | None = None
    family: str | None = None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class GrantStore:
    def __init__(self, path: Path | None, *, clock: Callable[[], float]) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path) if path else ":memory:", check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()
        self._clock = clock
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def put(
        self, kind: Kind, data: dict[str, Any], lifetime_s: float, *, family: str | None = None
    ) -> str:
        token = new_token()
        now = self._clock()
        with self._lock:
            # Expired rows are useless after their lifetime; revoked families are kept.
            self._db.execute("DELETE FROM grants WHERE expires_at < ?", (now - 3600,))
            self._db.execute(
                "INSERT INTO grants (kind, token_hash, family, data, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (kind.value, _hash(token), family, json.dumps(data), now + lifetime_s),
            )
        return token

    def get(self, kind: Kind, token: str) -> Taken:
        """Look a reusable grant (launch, pending) up without using it."""
        with self._lock:
            row = self._db.execute(
                "SELECT data, expires_at, family FROM grants WHERE kind = ? AND token_hash = ?",
                (kind.value, _hash(token)),
            ).fetchone()
        if row is None:
            return Taken(Outcome.UNKNOWN)
        if row[1] <= self._clock():
            return Taken(Outcome.EXPIRED)
        return Taken(Outcome.OK, json.loads(row[0]), row[2])

    def peek(self, kind: Kind, token: str) -> Taken:
        """Check a single-use grant without using it, so that a request refused for another
        reason (wrong verifier, redirect_uri, scope) leaves it to its rightful client. A
        grant already used is a replay: its family is revoked here too."""
        with self._lock:
            row = self._db.execute(
                "SELECT data, expires_at, family, used FROM grants "
                "WHERE kind = ? AND token_hash = ?",
                (kind.value, _hash(token)),
            ).fetchone()
            if row is None:
                return Taken(Outcome.UNKNOWN)
            data, expires_at, family, used = row
            if used:
                if family:
                    self._revoke(family)
                return Taken(Outcome.REUSED, family=family)
            if family and self._is_revoked(family):
                return Taken(Outcome.REVOKED, family=family)
        if expires_at <= self._clock():
            return Taken(Outcome.EXPIRED, family=family)
        return Taken(Outcome.OK, json.loads(data), family)

    def take(self, kind: Kind, token: str) -> Taken:
        """Use a single-use grant (code, refresh token). A second use revokes its family."""
        h = _hash(token)
        with self._lock:
            row = self._db.execute(
                "SELECT data, expires_at, family, used FROM grants "
                "WHERE kind = ? AND token_hash = ?",
                (kind.value, h),
            ).fetchone()
            if row is None:
                return Taken(Outcome.UNKNOWN)
            data, expires_at, family, used = row
            if used:
                if family:
                    self._revoke(family)
                return Taken(Outcome.REUSED, family=family)
            self._db.execute(
                "UPDATE grants SET used = 1 WHERE kind = ? AND token_hash = ?", (kind.value, h)
            )
            if family and self._is_revoked(family):
                return Taken(Outcome.REVOKED, family=family)
        if expires_at <= self._clock():
            return Taken(Outcome.EXPIRED, family=family)
        return Taken(Outcome.OK, json.loads(data), family)

    def delete(self, kind: Kind, token: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM grants WHERE kind = ? AND token_hash = ?", (kind.value, _hash(token))
            )

    def revoke(self, family: str) -> None:
        with self._lock:
            self._revoke(family)

    def is_revoked(self, family: str) -> bool:
        with self._lock:
            return self._is_revoked(family)

    def _revoke(self, family: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO revoked_families (family, revoked_at) VALUES (?, ?)",
            (family, self._clock()),
        )
        self._db.execute("UPDATE grants SET used = 1 WHERE family = ?", (family,))

    def _is_revoked(self, family: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM revoked_families WHERE family = ?", (family,)
        ).fetchone()
        return row is not None
