"""Find and fetch the pixels of an ImagingStudy, as shared/docs/FHIR_PROFILE.md describes.

Order: a ``Media`` whose ``partOf`` is the study (inline ``content.data`` or ``content.url``
→ ``Binary`` on the same FHIR server, or a URL on an allow-listed image host); a DICOMweb
``Endpoint`` is recognised and refused clearly (a later issue). Any other URL is refused:
fetching what a resource points at is an SSRF hole.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx

from cxr_errors import ImageError, ImageTooLargeError, MissingImageError
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.inbound import check_resource
from fhir_service.fhir.results import is_cxr_overlay


@dataclass(frozen=True)
class Pixels:
    data: bytes
    source: str
    """where they came from, for messages: 'Media/12 (Binary/13)'"""
    content_type: str | None


def input_media(fhir: FhirClient, study_id: str) -> list[dict[str, Any]]:
    """Media that carry the study's pixels, newest first (our own heatmaps excluded)."""
    found = [
        m
        for m in fhir.search_all("Media", {"part-of": f"ImagingStudy/{study_id}"})
        if not is_cxr_overlay(m) and m.get("status") not in ("entered-in-error", "not-done")
    ]
    found.sort(key=lambda m: m.get("meta", {}).get("lastUpdated", ""), reverse=True)
    return found


def fetch_pixels(
    fhir: FhirClient,
    study: dict[str, Any],
    *,
    max_bytes: int,
    allowed_hosts: frozenset[str] = frozenset(),
) -> Pixels:
    study_id = study["id"]
    media = input_media(fhir, study_id)
    if not media:
        if study.get("endpoint"):
            raise ImageError(
                f"ImagingStudy/{study_id} points at an Endpoint (DICOMweb); fetching pixels "
                "by DICOMweb is not supported yet — attach a Media with partOf this study"
            )
        raise MissingImageError(
            f"no pixels: no Media with partOf ImagingStudy/{study_id} holds an image"
        )
    m = media[0]
    content = m.get("content") or {}
    where = f"Media/{m['id']}"
    size = content.get("size")
    if isinstance(size, int) and size > max_bytes:
        raise ImageTooLargeError(f"{where} declares {size} bytes; the limit is {max_bytes}")
    encoded = content.get("data")
    if isinstance(encoded, str) and len(encoded) * 3 // 4 > max_bytes:
        raise ImageTooLargeError(f"{where} holds more than {max_bytes} bytes inline")
    # The size is checked first (no decoding of a huge body), and the inline pixels are left
    # to our own base64 decoder below: the model checks everything else about the Media.
    checked = {**content, "data": "AA=="} if isinstance(encoded, str) and encoded else content
    check_resource({**m, "content": checked}, "Media", what=where)
    if encoded:
        encoded = str(encoded)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"{where} content.data is not valid base64: {exc}") from exc
        return Pixels(data, where, content.get("contentType"))
    url = content.get("url")
    if not url:
        raise ImageError(f"{where} has neither content.data nor content.url")
    return _fetch_url(fhir, str(url), where, max_bytes, allowed_hosts, content.get("contentType"))


def _fetch_url(
    fhir: FhirClient,
    url: str,
    where: str,
    max_bytes: int,
    allowed_hosts: frozenset[str],
    content_type: str | None,
) -> Pixels:
    relative = url[len(fhir.base_url) + 1 :] if url.startswith(fhir.base_url + "/") else url
    if not relative.startswith(("http://", "https://")):
        if not relative.startswith("Binary/"):
            raise ImageError(f"{where} content.url {url!r} is not a Binary on this FHIR server")
        response = fhir.request("GET", relative, headers={"Accept": "application/octet-stream"})
        if len(response.content) > max_bytes:
            raise ImageTooLargeError(f"{relative} is larger than {max_bytes} bytes")
        return Pixels(
            response.content, f"{where} ({relative})", response.headers.get("content-type")
        )
    host = urlparse(relative).hostname or ""
    if host not in allowed_hosts:
        raise ImageError(
            f"{where} content.url points at {host!r}, which is neither this FHIR server nor an "
            "allow-listed image host (CXR_IMAGE_HOSTS)"
        )
    chunks: list[bytes] = []
    total = 0
    try:
        with httpx.stream("GET", relative, timeout=30, follow_redirects=False) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise ImageTooLargeError(f"{relative} is larger than {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ImageError(f"cannot fetch {relative}: {exc}") from exc
    return Pixels(b"".join(chunks), f"{where} ({relative})", content_type)
