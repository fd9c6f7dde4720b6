"""Which EHRs (``iss``) may launch the app: exact FHIR bases, or prefix patterns.

``/app/launch?iss=…`` makes the service fetch ``{iss}/.well-known/smart-configuration`` and
redirect the browser to the authorization endpoint it names, so an unlisted ``iss`` must get
neither a request nor a redirect, in any mode. ``CXR_APP_ISSUERS`` lists what may:

- an exact FHIR base, ``https://ehr.example.org/fhir``;
- a pattern with ``*`` for launchers that mint a base per launch (SMART's simulator:
  ``https://launch.smarthealthit.org/v/r4/sim/*/fhir``). ``*`` stands for one or more
  characters of **one** path segment (no ``/``), and the scheme, host and port before it
  must be written out, so a pattern can never match another host.

Empty in dev mode means the dev EHR's own FHIR base only
(``Settings.app_issuer_allow_list``); production must list its EHRs.
An ``iss`` is compared as given (trailing ``/`` aside): one with user information, a query,
a fragment, whitespace, a backslash, percent-encoding or a ``.``/``..`` segment is refused
outright, and host names are compared exactly (``localhost.`` is not ``localhost``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from cxr_errors import ConfigError

#: What ``*`` matches: one path segment's worth of unreserved and sub-delim characters.
_SEGMENT = r"[A-Za-z0-9\-._~!$&'()+,;=:]+"


def _well_formed(iss: str) -> bool:
    if any(c.isspace() or c in "\\%#?@" for c in iss):
        return False
    parts = urlsplit(iss)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return not any(seg in (".", "..") for seg in parts.path.split("/"))


def check_pattern(entry: str) -> str:
    """``entry`` if it is a usable allow-list entry, else ConfigError."""
    literal = entry.split("*", 1)[0]
    head = urlsplit(literal)
    if "*" in entry and not (head.scheme and head.netloc and head.path.startswith("/")):
        raise ConfigError(
            f"CXR_APP_ISSUERS entry {entry!r}: write scheme, host and port out before any *"
        )
    if not _well_formed(entry.replace("*", "x")):
        raise ConfigError(f"CXR_APP_ISSUERS entry {entry!r} is not an http(s) FHIR base")
    return entry


def _matches(iss: str, entry: str) -> bool:
    entry = entry.rstrip("/")
    if "*" not in entry:
        return iss == entry
    pattern = _SEGMENT.join(re.escape(part) for part in entry.split("*"))
    return re.fullmatch(pattern, iss) is not None


def issuer_allowed(iss: str, allowed: Iterable[str]) -> bool:
    iss = iss.rstrip("/")
    if not _well_formed(iss):
        return False
    return any(_matches(iss, entry) for entry in allowed)
