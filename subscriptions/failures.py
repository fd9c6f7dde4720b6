"""One classification of what can go wrong in a study job, and the one retry policy.

Every exception raised while fetching, decoding, analysing or writing a study is exactly one
of three kinds (:func:`classify`):

``bad-input``
    the study or its image cannot work (``InputError`` and below: no image, undecodable or
    oversized pixels, a malformed resource). Retrying cannot help: the study gets one failed
    ``Task`` with a reason a clerk understands, at once.
``transient``
    HAPI timeouts and 5xx, refused connections, database hiccups. Retried with exponential
    backoff long enough to outlast a HAPI or PostgreSQL restart; when the attempts run out the
    study gets a failed Task saying what kept failing.
``internal``
    anything else (a bug, a model that cannot run, HAPI refusing what we wrote). Retried a few
    times in case it was transient after all; on the final attempt the study gets a failed
    Task "internal error" naming a correlation id that is also in the log line with the
    traceback, so support can find it.

:class:`RetryPolicy` is procrastinate's retry strategy *and* what the job asks to know
whether the attempt it is on is the final one for the kind of error it just caught, so the
two can never disagree.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

import httpx
import psycopg
from procrastinate import BaseRetryStrategy, RetryDecision
from procrastinate.jobs import Job

from cxr_errors import (
    FhirUnavailableError,
    ImageError,
    ImageTooLargeError,
    InputError,
    MissingImageError,
    PacsUnavailableError,
    StoreError,
)
from fhir_service.fhir.inbound import MalformedResource

__all__ = [
    "DEFAULT_RETRY",
    "Failure",
    "Kind",
    "RetryPolicy",
    "classify",
    "new_correlation_id",
]


class Kind(StrEnum):
    BAD_INPUT = "bad-input"
    TRANSIENT = "transient"
    INTERNAL = "internal"


#: Transient failures: HAPI or PACS 5xx / timeouts, network and database hiccups.
TRANSIENT: tuple[type[BaseException], ...] = (
    FhirUnavailableError,
    PacsUnavailableError,
    StoreError,
    ConnectionError,
    TimeoutError,
    httpx.TransportError,
    psycopg.OperationalError,
)


@dataclass(frozen=True)
class Failure:
    kind: Kind
    business_status: str
    """short machine code for Task.businessStatus and the metrics' ``reason`` label"""
    reason: str
    """what a person reads (Task.statusReason.text)"""


def classify(exc: BaseException) -> Failure:
    """What kind of failure ``exc`` is, with its Task code and reason."""
    if isinstance(exc, InputError):
        return Failure(Kind.BAD_INPUT, _input_code(exc), exc.message)
    if isinstance(exc, TRANSIENT):
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return Failure(Kind.TRANSIENT, "retries-exhausted", str(message))
    return Failure(Kind.INTERNAL, "internal-error", f"{type(exc).__name__}: {exc}")


def _input_code(exc: InputError) -> str:
    if isinstance(exc, MissingImageError):
        return "no-pixels"
    if isinstance(exc, ImageTooLargeError):
        return "image-too-large"
    if isinstance(exc, ImageError):
        return "undecodable-image"
    if isinstance(exc, MalformedResource):
        return "invalid-resource"
    return "input-rejected"


def new_correlation_id() -> str:
    """A short random id joining a failed Task to the log lines of the attempt that wrote it."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class RetryPolicy(BaseRetryStrategy):
    """How often each kind of failure is retried, and how long apart.

    ``attempts`` as procrastinate counts them: 0 on the first run. With the defaults a
    transient failure is retried 10 times, 2, 4, 8, … 60 s apart (6 min in all: longer
    than a HAPI restart on a loaded machine), an internal one twice.
    """

    transient_retries: int = 10
    internal_retries: int = 2
    base_wait_s: float = 2.0
    max_wait_s: float = 60.0

    def retries(self, kind: Kind) -> int:
        if kind is Kind.TRANSIENT:
            return self.transient_retries
        if kind is Kind.INTERNAL:
            return self.internal_retries
        return 0

    def is_final(self, kind: Kind, attempts: int) -> bool:
        """Whether the run after ``attempts`` earlier ones is the last for this kind."""
        return attempts >= self.retries(kind)

    def wait_s(self, attempts: int) -> float:
        return float(min(self.max_wait_s, self.base_wait_s * 2**attempts))

    def total_wait_s(self, kind: Kind) -> float:
        return sum(self.wait_s(a) for a in range(self.retries(kind)))

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        kind = classify(exception).kind
        if self.is_final(kind, job.attempts):
            return None
        return RetryDecision(retry_in={"seconds": round(self.wait_s(job.attempts))})


DEFAULT_RETRY = RetryPolicy()
