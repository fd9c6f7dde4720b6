"""Rest-hook receiver logic: authenticate, parse, decide what to queue. No HTTP framework here.

Two kinds of notification: an ImagingStudy (queued when available or withdrawn) and a Media
(its studies queued: an image that arrives after its study)."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any

from cxr_errors import InputError
from fhir_service.fhir.inbound import check_resource
from fhir_service.fhir.results import is_cxr_overlay

#: A FHIR resource id (R4 §2.26.0.1).
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class Unauthorized(InputError):
    """The rest-hook secret header is missing or wrong."""

    http_status = 401
    issue_code = "security"


def check_secret(given: str | None, expected: str) -> None:
    """Constant-time comparison, so the secret cannot be guessed byte by byte from timings."""
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized()


@dataclass(frozen=True)
class Notification:
    study_id: str
    version_id: str
    status: str | None


def _checked(path_id: str, body: Any, kind: str) -> tuple[dict[str, Any], str]:
    """The notified ``kind`` resource, valid R4 with the path's id, and its versionId."""
    if not _FHIR_ID.fullmatch(path_id) or not path_id.strip("."):
        raise InputError(f"{path_id!r} is not a FHIR resource id")
    resource = check_resource(body, kind, what="rest-hook body")
    if str(resource.get("id", path_id)) != path_id:
        raise InputError(f"body id {resource.get('id')!r} does not match the URL id {path_id!r}")
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    if not isinstance(version, str | int) or isinstance(version, bool) or version == "":
        raise InputError(f"{kind} has no meta.versionId (payload must be the full resource)")
    return resource, str(version)


def parse_notification(path_id: str, body: Any) -> Notification:
    """The ImagingStudy HAPI PUT to ``{hook}/ImagingStudy/{id}``; its id must match the path."""
    study, version = _checked(path_id, body, "ImagingStudy")
    return Notification(path_id, version, study.get("status"))


#: What a study notification's status means for the job (``registered`` waits: its next
#: status change notifies again).
QUEUED_STATUSES = ("available", "cancelled", "entered-in-error")


@dataclass(frozen=True)
class MediaNotification:
    media_id: str
    version_id: str
    study_ids: tuple[str, ...]
    """the ImagingStudies the Media is ``partOf`` (empty for our own heatmaps)"""
    ours: bool


def parse_media_notification(path_id: str, body: Any) -> MediaNotification:
    """The Media HAPI PUT to ``{hook}/Media/{id}``: which studies it brings an image for."""
    body, version = _checked(path_id, body, "Media")
    if is_cxr_overlay(body):
        return MediaNotification(path_id, version, (), ours=True)
    studies = []
    for part in body.get("partOf", []):
        reference = str(part.get("reference") or "")
        kind, _, rest = reference.partition("/")
        study_id = rest.split("/")[0]
        if kind == "ImagingStudy" and study_id and study_id not in studies:
            studies.append(study_id)
    return MediaNotification(path_id, version, tuple(studies), ours=False)
