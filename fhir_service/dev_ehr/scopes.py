"""SMART scopes: parse v1/v2 resource scopes, grant a subset of what was asked, check access.

SMART App Launch 2.x scopes look like ``patient/Observation.rs`` (v2: a subset of ``cruds``
in that order) or ``patient/Observation.read`` (v1). What the dev EHR grants depends on the
launch context:

- **patient context** (an EHR launch bound to a patient, or a standalone launch that asks
  for one: ``launch/patient`` or ``patient/`` scopes → the patient picker): ``patient/``
  resource scopes only, as the client may have them;
- **user context** (an EHR launch with no patient, i.e. the clinician's worklist, or a
  standalone launch asking for no patient): ``user/`` resource scopes only, and only read,
  search, create and update (``crus``; v1 ``read``) — the proxy serves no deletes;
  ``launch/patient`` is not granted, as there is no patient to give.

``system/`` scopes are never granted (there is no backend-services flow), nor granular
scopes with a query part (``patient/Observation.rs?category=…``), since the proxy would have
to enforce the query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: A launch context: one patient in context, or the signed-in user across patients.
Context = Literal["patient", "user"]

_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
_RESOURCE_SCOPE = re.compile(
    r"(?P<context>patient|user|system)/(?P<type>[A-Z][A-Za-z]+|\*)"
    r"\.(?P<perms>read|write|\*|c?r?u?d?s?)(?P<query>\?.*)?"
)
#: What a ``user/`` scope may carry here: reads, searches, and the creates and updates the
#: proxy checks in a transaction (never deletes).
_USER_PERMISSIONS = frozenset("crus")


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


def _grantable(resource: ResourceScope, allowed: list[ResourceScope], context: Context) -> bool:
    if resource.context != context or resource.has_query:
        return False
    if context == "user" and not resource.permissions <= _USER_PERMISSIONS:
        return False
    return any(
        a.context == context
        and a.resource_type in ("*", resource.resource_type)
        and resource.permissions <= a.permissions
        for a in allowed
    )


def grant(
    requested: str | None, allowed: str, *, ehr_launch: bool, context: Context = "patient"
) -> list[str]:
    """The scopes granted for ``requested`` in ``context``: always a subset of it, and within
    ``allowed``.

    ``launch`` is granted only with an EHR launch context (the ``launch`` parameter),
    ``launch/patient`` only in patient context.
    """
    allowed_tokens = set(split(allowed))
    allowed_resource = [
        r for r in (parse_resource_scope(t) for t in allowed_tokens) if r is not None
    ]
    granted: list[str] = []
    for token in split(requested):
        resource = parse_resource_scope(token)
        if resource is not None:
            if _grantable(resource, allowed_resource, context):
                granted.append(token)
        elif token == "launch":
            if ehr_launch and token in allowed_tokens:
                granted.append(token)
        elif token == "launch/patient":
            if context == "patient" and token in allowed_tokens:
                granted.append(token)
        elif token in allowed_tokens:
            granted.append(token)
    return granted


def launch_context(
    requested: str | None, allowed: str, *, ehr_launch: bool, launch_patient: str | None
) -> Context:
    """The context an authorization runs in.

    An EHR launch brings its own: the patient bound to the launch, or none (a user-level
    launch). A standalone launch is in patient context when the client asks for a patient
    (``launch/patient`` or ``patient/`` scopes it may have: the picker then chooses one),
    otherwise in user context.
    """
    if ehr_launch:
        return "patient" if launch_patient is not None else "user"
    as_patient = grant(requested, allowed, ehr_launch=False, context="patient")
    return "patient" if needs_patient(as_patient) else "user"


def scopes_in(scopes: list[str], context: Context) -> list[ResourceScope]:
    """The resource scopes of ``context`` (``patient/…`` or ``user/…``) among ``scopes``."""
    return [r for r in (parse_resource_scope(s) for s in scopes) if r and r.context == context]


def permits(
    scopes: list[str], resource_type: str, permission: str, *, context: Context = "patient"
) -> bool:
    """Whether ``scopes`` allow ``permission`` (one of ``cruds``) on ``resource_type`` in
    ``context``: a patient token is judged by its ``patient/`` scopes only, a user token by
    its ``user/`` scopes only."""
    return any(r.covers(resource_type, permission) for r in scopes_in(scopes, context))


def needs_patient(scopes: list[str]) -> bool:
    return "launch/patient" in scopes or bool(scopes_in(scopes, "patient"))


def offers_refresh(scopes: list[str]) -> bool:
    # SMART: a refresh token comes with offline_access or online_access.
    return "offline_access" in scopes or "online_access" in scopes
