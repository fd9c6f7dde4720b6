"""Make sure exactly one rest-hook Subscription exists in HAPI for our hook, and is active.

The Subscription has a fixed, client-assigned id, so that restarts and any number of
service instances converge on one resource with ``PUT`` instead of racing creates.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cxr_errors import FhirError, NotFoundError, ServiceError
from fhir_service.fhir.client import FhirClient

log = logging.getLogger(__name__)

SUBSCRIPTION_ID = "cxr-imagingstudy-available"
CRITERIA = "ImagingStudy?status=available"
SECRET_HEADER = "X-Cxr-Secret"


def desired_subscription(endpoint: str, secret: str) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "id": SUBSCRIPTION_ID,
        "status": "requested",
        "reason": "cxr-fhir: chest X-ray triage of every available ImagingStudy",
        "criteria": CRITERIA,
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


def ensure_subscription(
    fhir: FhirClient, endpoint: str, secret: str, *, timeout_s: float = 90.0
) -> dict[str, Any]:
    """Create or update our Subscription and wait until HAPI reports it ``active``."""
    wanted = desired_subscription(endpoint, secret)
    try:
        current: dict[str, Any] | None = fhir.read("Subscription", SUBSCRIPTION_ID)
    except NotFoundError:
        current = None
    if current is None or not _same(current, wanted) or current.get("status") == "error":
        log.info("writing Subscription/%s → %s", SUBSCRIPTION_ID, endpoint)
        fhir.update(wanted)
    deadline = time.monotonic() + timeout_s
    while True:
        current = fhir.read("Subscription", SUBSCRIPTION_ID)
        status = current.get("status")
        if status == "active":
            return current
        if status == "error":
            raise FhirError(
                f"HAPI put Subscription/{SUBSCRIPTION_ID} in error: {current.get('error')}"
            )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"Subscription/{SUBSCRIPTION_ID} still {status!r} after {timeout_s:.0f} s "
                "(are rest-hook subscriptions enabled in HAPI?)"
            )
        time.sleep(0.5)
