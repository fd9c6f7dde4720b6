"""One classification of failures and one retry policy (procrastinate's and the job's)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest

from cxr_errors import (
    FhirError,
    FhirUnavailableError,
    ImageError,
    ImageTooLargeError,
    InputError,
    MissingImageError,
    ModelError,
    StoreError,
)
from fhir_service.fhir.inbound import MalformedResource
from subscriptions.failures import Kind, RetryPolicy, classify
from subscriptions.queue import RETRY


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (MissingImageError("no pixels"), Kind.BAD_INPUT, "no-pixels"),
        (ImageTooLargeError("big"), Kind.BAD_INPUT, "image-too-large"),
        (ImageError("truncated"), Kind.BAD_INPUT, "undecodable-image"),
        (MalformedResource("no status"), Kind.BAD_INPUT, "invalid-resource"),
        (InputError("odd"), Kind.BAD_INPUT, "input-rejected"),
        (FhirUnavailableError("503"), Kind.TRANSIENT, "retries-exhausted"),
        (StoreError("db"), Kind.TRANSIENT, "retries-exhausted"),
        (ConnectionRefusedError("refused"), Kind.TRANSIENT, "retries-exhausted"),
        (TimeoutError(), Kind.TRANSIENT, "retries-exhausted"),
        (httpx.ReadTimeout("slow"), Kind.TRANSIENT, "retries-exhausted"),
        (psycopg.OperationalError("server closed"), Kind.TRANSIENT, "retries-exhausted"),
        (FhirError("422 refused"), Kind.INTERNAL, "internal-error"),
        (ModelError("weights"), Kind.INTERNAL, "internal-error"),
        (KeyError("x"), Kind.INTERNAL, "internal-error"),
        (OSError("Truncated File Read"), Kind.INTERNAL, "internal-error"),
    ],
)  # fmt: skip
def test_every_exception_is_exactly_one_kind(exc: BaseException, kind: Kind, code: str) -> None:
    failure = classify(exc)
    assert failure.kind is kind
    assert failure.business_status == code
    assert failure.reason


def _job(attempts: int) -> Any:
    return SimpleNamespace(attempts=attempts)


def test_the_retry_policy_is_procrastinates_and_the_jobs() -> None:
    policy = RetryPolicy(transient_retries=3, internal_retries=1, base_wait_s=2, max_wait_s=5)
    transient, internal = FhirUnavailableError("x"), KeyError("y")
    waits = [policy.get_retry_decision(exception=transient, job=_job(a)) for a in range(4)]
    assert [d.retry_at is not None for d in waits[:3]] == [True, True, True]
    assert waits[3] is None
    assert [policy.wait_s(a) for a in range(4)] == [2, 4, 5, 5]
    assert [policy.is_final(Kind.TRANSIENT, a) for a in range(4)] == [False, False, False, True]
    assert policy.get_retry_decision(exception=internal, job=_job(0)) is not None
    assert policy.get_retry_decision(exception=internal, job=_job(1)) is None
    assert policy.is_final(Kind.BAD_INPUT, 0)
    assert policy.get_retry_decision(exception=ImageError("bad"), job=_job(0)) is None


def test_the_default_policy_outlasts_a_hapi_restart() -> None:
    # HAPI boots in 30-50 s (200 s on a badly loaded machine); the transient budget must
    # cover that, while an unknown error gives up within a minute.
    assert RETRY.total_wait_s(Kind.TRANSIENT) >= 240
    assert RETRY.total_wait_s(Kind.INTERNAL) <= 60
