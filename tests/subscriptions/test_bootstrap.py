"""The Subscription bootstrap against a busy HAPI: a PUT that timed out on our side but
committed on HAPI's, then a retry refused with 409, still ends with the Subscription active."""

from __future__ import annotations

import json
from typing import Any

import httpx

from fhir_service.fhir.client import FhirClient
from subscriptions import bootstrap
from subscriptions.bootstrap import (
    CRITERIA,
    MEDIA_CRITERIA,
    MEDIA_SUBSCRIPTION_ID,
    SUBSCRIPTION_ID,
    ensure_subscriptions,
)


def test_a_timed_out_put_that_committed_is_not_an_error(monkeypatch: Any) -> None:
    monkeypatch.setattr(bootstrap.time, "sleep", lambda s: None)
    stored: dict[str, dict[str, Any]] = {}
    puts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sid = request.url.path.rsplit("/", 1)[-1]
        if request.method == "GET":
            if sid not in stored:
                return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
            return httpx.Response(200, json=stored[sid])
        puts.append(sid)
        body = json.loads(request.content)
        if len(puts) == 1:  # HAPI commits, but answers too late for us
            stored[sid] = {**body, "status": "active"}
            raise httpx.ReadTimeout("timed out", request=request)
        if len(puts) == 2:  # our retry collides with that commit
            return httpx.Response(409, json={"resourceType": "OperationOutcome", "issue": []})
        stored[sid] = {**body, "status": "active"}
        return httpx.Response(200, json=stored[sid])

    fhir = FhirClient("http://fhir.test/fhir", transport=httpx.MockTransport(handler))
    subs = ensure_subscriptions(fhir, "http://svc/hook", "s3cret", timeout_s=30)
    assert [(s["id"], s["criteria"], s["status"]) for s in subs] == [
        (SUBSCRIPTION_ID, CRITERIA, "active"),
        (MEDIA_SUBSCRIPTION_ID, MEDIA_CRITERIA, "active"),
    ]
    # a Subscription switched off is switched on again (the service owns it)
    stored[SUBSCRIPTION_ID]["status"] = "off"
    assert ensure_subscriptions(fhir, "http://svc/hook", "s3cret")[0]["status"] == "active"
    # studies: timed out but committed (read back, done); images: 409, read, written again
    assert puts == [SUBSCRIPTION_ID, MEDIA_SUBSCRIPTION_ID, MEDIA_SUBSCRIPTION_ID, SUBSCRIPTION_ID]
