"""Rest-hook receiver logic: authenticate, parse, decide what to queue. No HTTP framework here.

Two kinds of notification: an ImagingStudy (queued when available or withdrawn) and a Media
(its studies queued: an image that arrives after its study)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from cxr_errors import InputError
from fhir_service.fhir.inbound import check_resource
from fhir_service.fhir.results import is_cxr_overlay


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


def parse_notification(path_id: str, body: Any) -> Notification:
    """The ImagingStudy HAPI PUT to ``{hook}/ImagingStudy/{id}``; its id must match the path."""
    body = check_resource(body, "ImagingStudy", what="rest-hook body")
    if str(body.get("id", path_id)) != path_id:
        raise InputError(f"body id {body.get('id')!r} does not match the URL id {path_id!r}")
    version = body.get("meta", {}).get("versionId")
    if not version:
        raise InputError("ImagingStudy has no meta.versionId (payload must be the full resource)")
    return Notification(path_id, str(version), body.get("status"))


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
    body = check_resource(body, "Media", what="rest-hook body")
    if str(body.get("id", path_id)) != path_id:
        raise InputError(f"body id {body.get('id')!r} does not match the URL id {path_id!r}")
    version = str(body.get("meta", {}).get("versionId") or "")
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
