"""The one exception tree of cxr-fhir.

Every package raises from this tree so that the FastAPI handler and the CLI can
turn any failure into one clear message (and, for HTTP, an ``OperationOutcome``
with the right status). Each class's docstring is its default message.

::

    CxrError
    ├── ConfigError          settings that cannot work (missing weights, bad URL, default secret)
    ├── InputError           bad input from a user or a client: 4xx, never retried
    │   ├── ImageError       pixels that cannot be decoded or are out of bounds
    │   │   ├── ImageTooLargeError
    │   │   ├── NotARadiographError   decodable, but not a frontal chest radiograph (models.gate)
    │   │   └── MissingImageError   no image for the study yet (it may still arrive)
    │   │       └── NotInPacsYetError   not in the PACS yet (looked for again by the sweep)
    │   ├── NotFoundError    an id that does not exist
    │   ├── ForbiddenError   the caller may not see this (outside its patient or scopes)
    │   ├── UnauthorizedError  no credentials, or ones that are not valid here
    │   └── PayloadTooLargeError  a request body over the configured limit
    ├── ModelError           the model cannot produce a result (weights, shapes)
    ├── FhirError            the FHIR server refused or failed a request
    │   └── FhirUnavailableError   transient: timeouts, 5xx; retried
    ├── PacsError            the PACS refused or failed a DICOMweb request
    │   └── PacsUnavailableError   transient: unreachable, timeouts, 5xx; retried
    ├── StoreError           the vector store / database failed
    └── ServiceError         a managed process (HAPI, PostgreSQL, worker) failed to start or stop
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CxrError",
    "FhirError",
    "FhirUnavailableError",
    "ForbiddenError",
    "ImageError",
    "ImageTooLargeError",
    "InputError",
    "MissingImageError",
    "ModelError",
    "NotARadiographError",
    "NotFoundError",
    "NotInPacsYetError",
    "PacsError",
    "PacsUnavailableError",
    "PayloadTooLargeError",
    "ServiceError",
    "StoreError",
    "UnauthorizedError",
]


class CxrError(Exception):
    """cxr-fhir failed."""

    #: HTTP status when this error reaches an API client.
    http_status: int = 500
    #: FHIR OperationOutcome.issue.code
    issue_code: str = "exception"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip().splitlines()[0]
        super().__init__(self.message)


class ConfigError(CxrError):
    """The configuration cannot work."""


class InputError(CxrError):
    """The input is invalid."""

    http_status = 400
    issue_code = "invalid"


class ImageError(InputError):
    """The pixel data is not a decodable chest X-ray image."""

    http_status = 422


class ImageTooLargeError(ImageError):
    """The image exceeds the configured size limits."""

    http_status = 413
    issue_code = "too-costly"


class NotARadiographError(ImageError):
    """The image is not a frontal chest radiograph."""


class MissingImageError(ImageError):
    """The study has no image yet."""

    http_status = 409
    issue_code = "incomplete"


class NotInPacsYetError(MissingImageError):
    """The study's image is not in the PACS (yet); nothing notifies us when it arrives there."""

    def __init__(self, message: str, study_uid: str) -> None:
        super().__init__(message)
        #: The Study Instance UID to look for again.
        self.study_uid = study_uid


class NotFoundError(InputError):
    """The requested resource does not exist."""

    http_status = 404
    issue_code = "not-found"


class ForbiddenError(InputError):
    """The caller may not see this resource."""

    http_status = 403
    issue_code = "forbidden"


class UnauthorizedError(InputError):
    """Credentials are missing or not valid here."""

    http_status = 401
    issue_code = "login"


class PayloadTooLargeError(InputError):
    """The request body exceeds the configured limit."""

    http_status = 413
    issue_code = "too-costly"


class ModelError(CxrError):
    """The model could not produce a result."""


class FhirError(CxrError):
    """The FHIR server refused or failed the request."""

    http_status = 502


class FhirUnavailableError(FhirError):
    """The FHIR server is unavailable (timeout or 5xx); the request may be retried."""

    http_status = 503
    issue_code = "transient"


class PacsError(CxrError):
    """The PACS refused or failed a DICOMweb request."""


class PacsUnavailableError(PacsError):
    """The PACS is unreachable, timed out or answered 5xx; the request may be retried."""


class StoreError(CxrError):
    """The vector store failed."""


class ServiceError(CxrError):
    """A managed process failed to start or stop."""
