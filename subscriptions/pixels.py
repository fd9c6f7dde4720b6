"""Find and fetch the pixels of an ImagingStudy, as shared/docs/FHIR_PROFILE.md describes.

Order: a DICOMweb ``Endpoint`` (connectionType ``dicom-wado-rs``, on the study or a series,
at the configured PACS) → the frontal instance over WADO-RS (:mod:`subscriptions.dicomweb`);
else a ``Media`` whose ``partOf`` is the study (inline ``content.data`` or ``content.url`` →
``Binary`` on the same FHIR server, or a URL on an allow-listed image host); else, when a PACS
is configured and the study carries a Study Instance UID, that study in the PACS. Any other
URL is refused: fetching what a resource points at is an SSRF hole.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import httpx

from cxr_errors import (
    ImageError,
    ImageTooLargeError,
    MissingImageError,
    NotInPacsYetError,
    PacsUnavailableError,
)
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.inbound import check_resource
from fhir_service.fhir.observation_links import SourceImage
from fhir_service.fhir.results import is_cxr_overlay
from subscriptions.dicomweb import (
    DicomInstance,
    DicomSource,
    pick_frontal,
    study_uid,
    wado_endpoint,
)


@dataclass(frozen=True)
class Pixels:
    data: bytes
    source: str
    """where they came from, for messages: 'Media/12 (Binary/13)'"""
    content_type: str | None
    instance: DicomInstance | None = None
    """the DICOM instance read over DICOMweb (None for the Media path)"""
    media: str | None = None
    """``Media/{id}`` whose pixels these are (None for the DICOMweb path)"""
    media_version: str | None = None
    """that Media's ``meta.versionId`` as read"""

    @property
    def source_image(self) -> SourceImage:
        """What each Observation names as the image it was read from."""
        sop = self.instance.sop_uid if self.instance is not None else None
        return SourceImage(media=self.media, sop_instance_uid=sop, media_version=self.media_version)


def input_media(
    fhir: FhirClient, study_id: str, *, without_content: bool = False
) -> list[dict[str, Any]]:
    """Media that carry the study's pixels, newest first (our own heatmaps excluded);
    ``without_content``: only what tells them apart (id, meta, status, identifier)."""
    params = {"part-of": f"ImagingStudy/{study_id}"}
    if without_content:
        params["_elements"] = "id,meta,status,identifier,partOf"
    found = [
        m
        for m in fhir.search_all("Media", params)
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
    pacs: DicomSource | None = None,
) -> Pixels:
    study_id = study["id"]
    uid = study_uid(study)
    if wado_endpoint(fhir, study, pacs):
        assert pacs is not None  # wado_endpoint refuses an Endpoint without a PACS
        try:
            return fetch_dicomweb(study, pacs, max_bytes)
        except MissingImageError as exc:
            # The study is registered before the modality's STOW reaches the PACS.
            raise NotInPacsYetError(exc.message, uid or "") from exc
    media = input_media(fhir, study_id)
    if not media:
        if pacs is not None and uid:
            try:
                return fetch_dicomweb(study, pacs, max_bytes)
            except (PacsUnavailableError, MissingImageError) as exc:
                # No Endpoint says the pixels are in the PACS: a PACS that is down or does not
                # hold the study is one more place the image is not yet, and the study waits
                # for it (or a Media).
                raise NotInPacsYetError(
                    f"no pixels: no Media with partOf ImagingStudy/{study_id}, and {exc.message}",
                    uid,
                ) from exc
        raise MissingImageError(
            f"no pixels: no Media with partOf ImagingStudy/{study_id} holds an image"
        )
    return _from_media(fhir, media[0], max_bytes, allowed_hosts)


def fetch_dicomweb(study: dict[str, Any], pacs: DicomSource, max_bytes: int) -> Pixels:
    """The study's frontal chest instance from the PACS, as a Part 10 file."""
    uid = study_uid(study)
    where = f"ImagingStudy/{study.get('id')}"
    if not uid:
        raise ImageError(f"{where} names a DICOMweb Endpoint but no Study Instance UID identifier")
    chosen = pick_frontal(pacs.study_instances(uid), f"{where} (study {uid})")
    data = pacs.instance(chosen.study_uid, chosen.series_uid, chosen.sop_uid, max_bytes=max_bytes)
    return Pixels(
        data, f"{where} (DICOMweb instance {chosen.sop_uid})", "application/dicom", chosen
    )


def _from_media(
    fhir: FhirClient, m: dict[str, Any], max_bytes: int, allowed_hosts: frozenset[str]
) -> Pixels:
    content = m.get("content") or {}
    where = f"Media/{m['id']}"
    read_version = (m.get("meta") or {}).get("versionId")
    version = str(read_version) if read_version else None
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
        return Pixels(data, where, content.get("contentType"), media=where, media_version=version)
    url = content.get("url")
    if not url:
        raise ImageError(f"{where} has neither content.data nor content.url")
    ctype = content.get("contentType")
    fetched = _fetch_url(fhir, str(url), where, max_bytes, allowed_hosts, ctype)
    return replace(fetched, media=where, media_version=version)


#: A Binary id (FHIR R4 id), the only thing a same-server image URL may name.
_BINARY = re.compile(r"Binary/(?P<id>[A-Za-z0-9\-.]{1,64})")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _unsafe(text: str) -> bool:
    return any(c.isspace() or ord(c) < 32 or c == "\\" for c in text)


def _decoded(url: str, where: str) -> str:
    """``url`` with percent-encoding undone until it is stable (``%252e`` → ``%2e`` → ``.``),
    refusing characters no image URL needs: a check on the encoded form would let
    ``Binary/%2e%2e/%2e%2e/Patient/1`` through."""
    if _unsafe(url):
        raise ImageError(f"{where} content.url {url!r} contains whitespace or a backslash")
    text = url
    for _ in range(4):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    if "%" in text or _unsafe(text):
        raise ImageError(f"{where} content.url {url!r} is encoded more than we accept")
    return text


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def same_server_binary(base_url: str, url: str, where: str) -> str | None:
    """``Binary/{id}`` when ``url`` names a Binary on the FHIR server at ``base_url``
    (relative, or absolute under the base); None when it points at another server. Anything
    else that claims this server, or tries to leave ``Binary/`` (``..``, ``.``, encoded or
    not, a query), is refused: the worker reads it with the service's own access."""
    text = _decoded(url, where)
    parts = urlsplit(text)
    extra = parts.query or parts.fragment
    relative = parts.path
    if parts.scheme or parts.netloc:
        base = urlsplit(base_url.rstrip("/"))
        if _origin(parts) != _origin(base) or "@" in parts.netloc:
            return None
        prefix = base.path.rstrip("/") + "/"
        if not parts.path.startswith(prefix):
            raise ImageError(f"{where} content.url {url!r} is not under this FHIR base")
        relative = parts.path[len(prefix) :]
    m = _BINARY.fullmatch(relative)
    if m is None or extra or m.group("id").strip(".") == "":
        raise ImageError(f"{where} content.url {url!r} is not a Binary on this FHIR server")
    return relative


def _external(url: str, where: str, allowed_hosts: frozenset[str]) -> str:
    """``url`` when it is on an allow-listed image host, else ImageError. Exact host names
    only: no user information (``http://allowed@evil/``), no other scheme; ``localhost.``,
    ``[::1]`` and ``2130706433`` are hosts of their own, refused unless listed as such."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise ImageError(f"{where} content.url {url!r} is not an http(s) URL")
    if "@" in parts.netloc:
        raise ImageError(f"{where} content.url {url!r} carries user information")
    host = parts.hostname or ""
    if host not in allowed_hosts:
        raise ImageError(
            f"{where} content.url points at {host!r}, which is neither this FHIR server nor an "
            "allow-listed image host (CXR_IMAGE_HOSTS)"
        )
    return url


def _fetch_url(
    fhir: FhirClient,
    url: str,
    where: str,
    max_bytes: int,
    allowed_hosts: frozenset[str],
    content_type: str | None,
) -> Pixels:
    relative = same_server_binary(fhir.base_url, url, where)
    if relative is not None:
        response = fhir.request("GET", relative, headers={"Accept": "application/octet-stream"})
        if len(response.content) > max_bytes:
            raise ImageTooLargeError(f"{relative} is larger than {max_bytes} bytes")
        return Pixels(
            response.content, f"{where} ({relative})", response.headers.get("content-type")
        )
    target = _external(url, where, allowed_hosts)
    chunks: list[bytes] = []
    total = 0
    try:
        with httpx.stream("GET", target, timeout=30, follow_redirects=False) as response:
            if response.status_code != 200:
                # Redirects are not followed: one could lead past the allow-list.
                raise ImageError(f"cannot fetch {target}: it answered {response.status_code}")
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise ImageTooLargeError(f"{target} is larger than {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ImageError(f"cannot fetch {target}: {exc}") from exc
    return Pixels(b"".join(chunks), f"{where} ({target})", content_type)
