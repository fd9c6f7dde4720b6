"""A small DICOMweb client over ``dicomweb-client``, with our error classification.

What the worker needs from a PACS: the metadata of every instance of a study (WADO-RS
``/studies/{uid}/metadata``: the headers the frontal-image rule reads, no pixels), one
instance as a DICOM Part 10 file in its stored transfer syntax (WADO-RS, so the decoder sees
what the modality sent: JPEG, JPEG 2000, JPEG-LS, RLE or uncompressed), and STOW-RS for the
objects we write back. Errors become :class:`~cxr_errors.PacsUnavailableError` (unreachable,
timeout, 5xx: retried) or :class:`~cxr_errors.PacsError`; a study the PACS does not hold
(yet) is :class:`~cxr_errors.MissingImageError`, so the job waits for it like a late image.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from cxr_errors import ImageTooLargeError, MissingImageError, PacsError, PacsUnavailableError

__all__ = ["DicomwebAuth", "DicomwebPacs", "dataset_bytes"]

T = TypeVar("T")


@dataclass(frozen=True)
class DicomwebAuth:
    """Credentials for the PACS: a bearer token, or basic user + password, or none."""

    token: str | None = None
    username: str | None = None
    password: str | None = None


class _TimeoutSession(requests.Session):
    """A session whose every request has a timeout (dicomweb-client sets none)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(method, url, *args, **kwargs)


def dataset_bytes(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble, file meta, data set)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _as_part10(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` as dicomweb-client will write it: a Part 10 file with preamble and ``DICM``.
    pydicom writes a dataset built in memory (highdicom's SR and SEG, a wrapped PNG) without
    them, and the PACS then stores and serves a file that no reader opens by default."""
    if getattr(ds, "preamble", None) is not None and "TransferSyntaxUID" in getattr(
        ds, "file_meta", {}
    ):
        return ds
    return pydicom.dcmread(io.BytesIO(dataset_bytes(ds)))


def _no_bulk_data(tag: str, vr: str, uri: str) -> bytes:
    return b""


def _dataset(item: dict[str, Any]) -> pydicom.Dataset:
    """A DICOM JSON object as a Dataset, leaving out an element whose value its VR does not
    allow (real archives hold e.g. PatientAge "62" where AS wants "062Y"): one bad header
    field must not make a study unreadable."""
    try:
        return pydicom.Dataset.from_json(item, _no_bulk_data)
    except ValueError:
        ds = pydicom.Dataset()
        for tag, element in item.items():
            try:
                ds.update(pydicom.Dataset.from_json({tag: element}, _no_bulk_data))
            except ValueError:
                continue
        return ds


class DicomwebPacs:
    """One PACS at a DICOMweb base URL."""

    def __init__(
        self, base_url: str, auth: DicomwebAuth | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        session = _TimeoutSession(timeout_s)
        auth = auth or DicomwebAuth()
        if auth.token:
            session.headers["Authorization"] = f"Bearer {auth.token}"
        elif auth.username is not None:
            session.auth = (auth.username, auth.password or "")
        self._client = DICOMwebClient(url=self.base_url, session=session)
        # No retries inside a request: the job queue retries transient failures with its own
        # backoff (subscriptions.failures), and a worker must not sit in a hidden loop.
        self._client.set_http_retry_params(retry=False)

    def _call(self, what: str, fn: Callable[[], T], *, missing: str | None = None) -> T:
        try:
            return fn()
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsUnavailableError(
                f"the PACS at {self.base_url} is unreachable ({what}): {type(exc).__name__}"
            ) from exc
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status >= 500 or status in (408, 429):
                raise PacsUnavailableError(
                    f"the PACS at {self.base_url} answered {status} to {what}"
                ) from exc
            if status == 404 and missing is not None:
                raise MissingImageError(missing) from exc
            if status in (401, 403):
                raise PacsError(
                    f"the PACS at {self.base_url} refused {what} ({status}): check "
                    "CXR_DICOMWEB_TOKEN, or CXR_DICOMWEB_USERNAME and CXR_DICOMWEB_PASSWORD"
                ) from exc
            raise PacsError(f"the PACS at {self.base_url} answered {status} to {what}") from exc

    def study_instances(self, study_uid: str) -> list[pydicom.Dataset]:
        """The header of every instance of the study (no pixel data)."""
        items = self._call(
            f"the metadata of study {study_uid}",
            lambda: self._client.retrieve_study_metadata(study_uid),
            missing=f"the PACS at {self.base_url} holds no study {study_uid} (yet)",
        )
        if not items:
            raise MissingImageError(
                f"the PACS at {self.base_url} holds no instances of {study_uid}"
            )
        return [_dataset(item) for item in items]

    def instance(self, study_uid: str, series_uid: str, sop_uid: str, *, max_bytes: int) -> bytes:
        """One instance as a Part 10 file, in the transfer syntax the PACS stored."""
        ds = self._call(
            f"WADO-RS of instance {sop_uid}",
            lambda: self._client.retrieve_instance(
                study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),)
            ),
            missing=f"the PACS at {self.base_url} no longer holds instance {sop_uid}",
        )
        data = dataset_bytes(ds)
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"instance {sop_uid} is larger than {max_bytes} bytes")
        return data

    def store(self, datasets: Sequence[pydicom.Dataset]) -> None:
        """STOW-RS the datasets (one request); an instance the PACS refused is an error."""
        files = [_as_part10(ds) for ds in datasets]
        response = self._call("STOW-RS", lambda: self._client.store_instances(files))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            uids = ", ".join(str(item.get("ReferencedSOPInstanceUID", "?")) for item in failed)
            raise PacsError(f"the PACS at {self.base_url} refused instances {uids} (STOW-RS)")

    def study_uids(self, **search: str) -> list[str]:
        """QIDO-RS: Study Instance UIDs matching ``search`` (e.g. ``PatientID``)."""
        found = self._call(
            "QIDO-RS", lambda: self._client.search_for_studies(search_filters=dict(search))
        )
        return [str(_dataset(f).StudyInstanceUID) for f in found]
