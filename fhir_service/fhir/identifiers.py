"""The keys cxr-fhir writes down: report, study-model, observation and Task identifiers.

Every result is keyed so that writing it twice creates nothing (shared/docs/FHIR_PROFILE.md):
the report identifier is (study, model version, image sha256), the Task identifier the study
alone.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote

from fhir_service.fhir.terminology import TERMINOLOGY, Terminology

__all__ = [
    "report_identifier",
    "search_token",
    "study_model_identifier",
    "task_conditional_url",
    "task_identifier",
    "token_search_value",
]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _digest(*parts: str) -> str:
    # The unit separator cannot occur in ids, versions or hex digests, so the join is unambiguous.
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def report_identifier(
    study_id: str,
    model_version: str,
    image_sha256: str,
    *,
    revision: int = 0,
    terminology: Terminology = TERMINOLOGY,
) -> tuple[str, str]:
    """(system, value) of the report for these pixels of this study by this model.

    The idempotency key of the whole result: the value is the sha256 of the three parts, so it
    is a plain token (no escaping in searches) of fixed length whatever the model version holds.
    ``revision`` > 0 keys a report of pixels whose earlier report was withdrawn (the image
    changed and then came back): a withdrawn report is never made current again.
    """
    if not _SHA256_HEX.match(image_sha256):
        raise ValueError(f"image_sha256 must be 64 lowercase hex digits, got {image_sha256!r}")
    if revision < 0:
        raise ValueError(f"revision must be 0 or more, got {revision}")
    parts = ("report", study_id, model_version, image_sha256)
    value = _digest(*parts, f"revision {revision}") if revision else _digest(*parts)
    return terminology.identifier_system("report"), value


def study_model_identifier(
    study_id: str, model_version: str, *, terminology: Terminology = TERMINOLOGY
) -> tuple[str, str]:
    """(system, value) shared by every report of this study by this model, whatever the pixels.

    Lets the reconciliation sweep ask "does this study have a report for the current model?"
    without fetching and hashing the pixels.
    """
    value = _digest("study-model", study_id, model_version)
    return terminology.identifier_system("report_study_model"), value


def task_identifier(study_id: str, *, terminology: Terminology = TERMINOLOGY) -> tuple[str, str]:
    """(system, value) of the one analysis Task of a study: keyed on the study alone, so a
    retry (with any model version) updates that Task instead of adding one."""
    return terminology.identifier_system("task"), study_id


def token_search_value(system: str, value: str) -> str:
    """``system|value`` for a token search parameter, escaped and percent-encoded.

    FHIR search escapes ``\\ | , $`` with a backslash; HAPI url-decodes ``ifNoneExist`` and
    conditional URLs, so a ``+`` left raw would come back as a space.
    """
    escaped = re.sub(r"([\\|,$])", r"\\\1", value)
    return f"{quote(system, safe=':/')}|{quote(escaped, safe='')}"


def task_conditional_url(study_id: str, *, terminology: Terminology = TERMINOLOGY) -> str:
    """The conditional-update URL of a study's Task: ``PUT Task?identifier=...``."""
    return "Task?identifier=" + token_search_value(
        *task_identifier(study_id, terminology=terminology)
    )


def search_token(system: str, value: str) -> dict[str, str]:
    """``{"identifier": "system|value"}`` for a search by identifier (httpx encodes it)."""
    return {"identifier": f"{system}|{value}"}
