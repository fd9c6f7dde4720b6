"""Rest-hook receiver logic: authenticate, parse, decide what to queue. No HTTP framework here."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any

from cxr_errors import InputError
from fhir_service.fhir.inbound import check_resource

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


def parse_notification(path_id: str, body: Any) -> Notification:
    """The ImagingStudy HAPI PUT to ``{hook}/ImagingStudy/{id}``; its id must match the path."""
    if not _FHIR_ID.fullmatch(path_id) or not path_id.strip("."):
        raise InputError(f"{path_id!r} is not a FHIR resource id")
    body = check_resource(body, "ImagingStudy", what="rest-hook body")
    if str(body.get("id", path_id)) != path_id:
        raise InputError(f"body id {body.get('id')!r} does not match the URL id {path_id!r}")
    meta = body.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    if not isinstance(version, str | int) or isinstance(version, bool) or version == "":
        raise InputError("ImagingStudy has no meta.versionId (payload must be the full resource)")
    status = body.get("status")
    return Notification(path_id, str(version), status)
