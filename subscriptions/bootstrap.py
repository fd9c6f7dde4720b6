"""Make sure our two rest-hook Subscriptions exist in HAPI, once each, and are active.

* studies: ``ImagingStudy`` when it becomes ``available`` (go) or is withdrawn (``cancelled``,
  ``entered-in-error``); a ``registered`` study waits for its next status, no notification;
* images: a ``completed`` ``Media``, so a study whose image comes after it (the order a
  PACS-fed EHR posts them in) is processed when the image arrives. The receiver queues the
  studies a Media is ``partOf`` and ignores the rest, our own heatmaps included. (HAPI 8.8
  cannot match ``Media?part-of:missing=false``: the in-memory matcher refuses the modifier
  and its database matcher fails with HAPI-2223, so the filter is ours.)

Each has a fixed, client-assigned id, so that restarts and any number of service instances
converge on one resource per kind with ``PUT`` instead of racing creates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cxr_errors import FhirError, FhirUnavailableError, NotFoundError, ServiceError
from fhir_service.fhir.client import FhirClient

log = logging.getLogger(__name__)

SUBSCRIPTION_ID = "cxr-imagingstudy-available"
CRITERIA = "ImagingStudy?status=available,cancelled,entered-in-error"
MEDIA_SUBSCRIPTION_ID = "cxr-media-part-of"
MEDIA_CRITERIA = "Media?status=completed"
SECRET_HEADER = "X-Cxr-Secret"
T = TypeVar("T")

_REASONS = {
    SUBSCRIPTION_ID: "cxr-fhir: chest X-ray triage of every available ImagingStudy",
    MEDIA_SUBSCRIPTION_ID: "cxr-fhir: study images (partOf), which may come after the study",
}


def desired_subscription(
    endpoint: str, secret: str, *, sid: str = SUBSCRIPTION_ID, criteria: str = CRITERIA
) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "id": sid,
        "status": "requested",
        "reason": _REASONS.get(sid, "cxr-fhir"),
        "criteria": criteria,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "header": [f"{SECRET_HEADER}: {secret}"],
        },
    }


def _same(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return current.get("criteria") == wanted["criteria"] and all(
        current.get("channel", {}).get(k) == wanted["channel"][k]
        for k in ("type", "endpoint", "payload", "header")
    )


def ensure_subscriptions(
    fhir: FhirClient, endpoint: str, secret: str, *, timeout_s: float = 90.0
) -> list[dict[str, Any]]:
    """Both Subscriptions (studies, then images), each active."""
    return [
        ensure_subscription(fhir, endpoint, secret, timeout_s=timeout_s),
        ensure_subscription(
            fhir,
            endpoint,
            secret,
            timeout_s=timeout_s,
            sid=MEDIA_SUBSCRIPTION_ID,
            criteria=MEDIA_CRITERIA,
        ),
    ]


def ensure_subscription(
    fhir: FhirClient,
    endpoint: str,
    secret: str,
    *,
    timeout_s: float = 90.0,
    sid: str = SUBSCRIPTION_ID,
    criteria: str = CRITERIA,
) -> dict[str, Any]:
    """Create or update one Subscription and wait until HAPI reports it ``active``.

    One that an operator switched ``off`` is switched back on: the service owns it.
    """
    wanted = desired_subscription(endpoint, secret, sid=sid, criteria=criteria)
    deadline = time.monotonic() + timeout_s
    _until(deadline, lambda: _write_if_needed(fhir, wanted))
    while True:
        current = _until(deadline, lambda: fhir.read("Subscription", sid))
        status = current.get("status")
        if status == "active":
            return current
        if status == "error":
            raise FhirError(f"HAPI put Subscription/{sid} in error: {current.get('error')}")
        if time.monotonic() > deadline:
            raise ServiceError(
                f"Subscription/{sid} still {status!r} after {timeout_s:.0f} s "
                "(are rest-hook subscriptions enabled in HAPI?)"
            )
        time.sleep(0.5)


def _write_if_needed(fhir: FhirClient, wanted: dict[str, Any]) -> None:
    sid = wanted["id"]
    try:
        current: dict[str, Any] | None = fhir.read("Subscription", sid)
    except NotFoundError:
        current = None
    if current is None or not _same(current, wanted) or current.get("status") in ("error", "off"):
        endpoint = wanted["channel"]["endpoint"]
        log.info("writing Subscription/%s (%s) → %s", sid, wanted["criteria"], endpoint)
        fhir.update(wanted)


def _until(deadline: float, step: Callable[[], T]) -> T:
    """``step`` again after a timeout or a 5xx (a busy or restarting HAPI; the PUT is
    idempotent) until ``deadline``. A PUT that timed out on our side may still commit on
    HAPI's, and the retry then collides with it (409): read again, it is there."""
    while True:
        try:
            return step()
        except FhirError as exc:
            transient = isinstance(exc, FhirUnavailableError) or exc.http_status in (409, 412)
            if not transient or time.monotonic() > deadline:
                raise
            log.warning("HAPI not answering yet (%s); trying again", exc.message)
            time.sleep(2.0)
