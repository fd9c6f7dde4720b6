"""What one launch may show, enforced by the app itself.

A SMART server's FHIR proxy is *not* required to narrow what a token reads to the launch's
patient: a standard EHR may answer a patient-scoped token's search with every patient's
resources, and SMART leaves the filtering to the app. So in **patient** mode every search the
app makes names the launch's patient (``patient=…``, ``_id`` for Patient), and every resource
that comes back is checked against that patient before anything is drawn: a resource of
another patient (or one whose patient cannot be told) is withheld and logged, and a direct
read of one is refused (:class:`~cxr_errors.ForbiddenError`, 403).

In **user** mode (a user-level launch) the user's ``user/`` scopes decide: a type the scopes
do not grant read (or search) of is neither asked for nor shown.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cxr_errors import ForbiddenError
from fhir_service.app_ui.smart import Mode, user_permissions

log = logging.getLogger(__name__)

#: Where a resource of each type the app reads names its patient (R4), and the search
#: parameter that selects by that patient (R4: ``patient`` on all five; ``Task.for``).
PATIENT_ELEMENT: dict[str, str] = {
    "ImagingStudy": "subject",
    "DiagnosticReport": "subject",
    "Observation": "subject",
    "Media": "subject",
    "Task": "for",
    "ServiceRequest": "subject",
}
PATIENT_SEARCH_PARAM = "patient"
#: ``Patient/{id}``, ``{base}/Patient/{id}``, either with ``/_history/{v}``; nothing else.
_PATIENT_REFERENCE = re.compile(
    r"(?:^|^https?://[^?#\s]+/)Patient/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/?#]+)?"
)


def patient_of(resource: Mapping[str, Any]) -> str | None:
    """The id of the Patient ``resource`` is about, or None when it names none we can read
    (no reference, a contained or logical reference, another resource type)."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        rid = resource.get("id")
        return str(rid) if rid else None
    element = PATIENT_ELEMENT.get(str(rtype))
    ref = resource.get(element) if element else None
    if not isinstance(ref, Mapping):
        return None
    m = _PATIENT_REFERENCE.fullmatch(str(ref.get("reference", "")))
    return m.group("id") if m else None


@dataclass(frozen=True)
class LaunchAccess:
    """One session's launch: its mode, its patient (patient mode) and its granted scopes."""

    mode: Mode
    patient: str | None
    scope: str

    def __post_init__(self) -> None:
        if self.mode == "patient" and not self.patient:
            raise ForbiddenError("a patient launch without a patient shows nothing")

    def may(self, rtype: str, permission: str) -> bool:
        """Whether the app asks the EHR for ``rtype`` at all: in user mode only what the
        ``user/`` scopes grant (``r`` read, ``s`` search); in patient mode the types whose
        patient it can check."""
        if self.mode == "user":
            return permission in user_permissions(self.scope, rtype)
        return rtype == "Patient" or rtype in PATIENT_ELEMENT

    def search_params(self, rtype: str, params: Mapping[str, str]) -> dict[str, str]:
        """``params`` bound to the launch: in patient mode the launch's patient replaces any
        patient the caller named (a search is never widened beyond it)."""
        out = dict(params)
        if self.mode == "user":
            return out
        if rtype == "Patient":
            out["_id"] = str(self.patient)
            return out
        if rtype not in PATIENT_ELEMENT:
            raise ForbiddenError(f"{rtype} is not read in a patient launch")
        for key in list(out):
            if key.split(":")[0].split(".")[0] in (PATIENT_SEARCH_PARAM, "subject"):
                del out[key]
        out[PATIENT_SEARCH_PARAM] = str(self.patient)
        return out

    def shows(self, resource: Mapping[str, Any]) -> bool:
        rtype = str(resource.get("resourceType", ""))
        if self.mode == "user":
            return self.may(rtype, "r")
        return patient_of(resource) == self.patient

    def admit(self, resources: Iterable[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        """The resources this launch may show; the others are withheld and logged."""
        kept: list[dict[str, Any]] = []
        for resource in resources:
            if self.shows(resource):
                kept.append(resource)
            else:
                self._withheld(resource, what)
        return kept

    def check(self, resource: Mapping[str, Any], what: str) -> None:
        """Refuse (403) one resource this launch may not show."""
        if not self.shows(resource):
            self._withheld(resource, what)
            raise ForbiddenError(f"{_name(resource)} is outside this launch ({self})")

    def _withheld(self, resource: Mapping[str, Any], what: str) -> None:
        owner = patient_of(resource)
        log.warning(
            "withheld %s from %s: it belongs to %s, outside the %s",
            _name(resource),
            what,
            f"Patient/{owner}" if owner else "no readable patient",
            self,
        )

    def __str__(self) -> str:
        return f"patient launch for Patient/{self.patient}" if self.patient else "user launch"


def _name(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"
