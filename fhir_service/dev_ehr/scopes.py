"""SMART scopes: parse v1/v2 resource scopes, grant a subset of what was asked, check access.

SMART App Launch 2.x scopes look like ``patient/Observation.rs`` (v2: a subset of ``cruds``
in that order) or ``patient/Observation.read`` (v1). The dev EHR only serves the patient
compartment, so it grants ``patient/`` resource scopes and never ``user/`` or ``system/``
ones; granular scopes with a query part (``patient/Observation.rs?category=…``) are not
granted either, since the proxy would have to enforce the query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
_RESOURCE_SCOPE = re.compile(
    r"(?P<context>patient|user|system)/(?P<type>[A-Z][A-Za-z]+|\*)"
    r"\.(?P<perms>read|write|\*|c?r?u?d?s?)(?P<query>\?.*)?"
)


@dataclass(frozen=True)
class ResourceScope:
    context: str
    resource_type: str
    permissions: frozenset[str]
    has_query: bool

    def covers(self, resource_type: str, permission: str) -> bool:
        return self.resource_type in ("*", resource_type) and permission in self.permissions


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """The resource scope ``scope`` names, or None for anything else (``openid``, ``launch``)."""
    m = _RESOURCE_SCOPE.fullmatch(scope)
    if m is None or not m.group("perms"):
        return None
    perms = _V1_PERMISSIONS.get(m.group("perms"), m.group("perms"))
    return ResourceScope(
        context=m.group("context"),
        resource_type=m.group("type"),
        permissions=frozenset(perms),
        has_query=m.group("query") is not None,
    )


def split(scope: str | None) -> list[str]:
    """Scope tokens in order, without duplicates."""
    return list(dict.fromkeys((scope or "").split()))


def grant(requested: str | None, allowed: str, *, ehr_launch: bool) -> list[str]:
    """The scopes granted for ``requested``: always a subset of it, and within ``allowed``.

    ``launch`` is granted only with an EHR launch context (the ``launch`` parameter).
    """
    allowed_tokens = set(split(allowed))
    allowed_resource = [
        r for r in (parse_resource_scope(t) for t in allowed_tokens) if r is not None
    ]
    granted: list[str] = []
    for token in split(requested):
        resource = parse_resource_scope(token)
        if resource is not None:
            if (
                resource.context == "patient"
                and not resource.has_query
                and any(
                    a.context == "patient"
                    and a.resource_type in ("*", resource.resource_type)
                    and resource.permissions <= a.permissions
                    for a in allowed_resource
                )
            ):
                granted.append(token)
        elif token == "launch":
            if ehr_launch and token in allowed_tokens:
                granted.append(token)
        elif token in allowed_tokens:
            granted.append(token)
    return granted


def patient_scopes(scopes: list[str]) -> list[ResourceScope]:
    return [r for r in (parse_resource_scope(s) for s in scopes) if r and r.context == "patient"]


def permits(scopes: list[str], resource_type: str, permission: str) -> bool:
    """Whether ``scopes`` allow ``permission`` (one of ``cruds``) on ``resource_type``."""
    return any(r.covers(resource_type, permission) for r in patient_scopes(scopes))


def needs_patient(scopes: list[str]) -> bool:
    return "launch/patient" in scopes or bool(patient_scopes(scopes))


def offers_refresh(scopes: list[str]) -> bool:
    # SMART: a refresh token comes with offline_access or online_access.
    return "offline_access" in scopes or "online_access" in scopes
