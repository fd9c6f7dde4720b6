"""FhirClient error mapping and read retries, against httpx.MockTransport."""

from __future__ import annotations

import httpx
import pytest

from cxr_errors import FhirError, FhirUnavailableError, NotFoundError
from fhir_service.fhir import client as fhir_client
from fhir_service.fhir.client import FhirClient


def _client(responses: list[httpx.Response], calls: list[str]) -> FhirClient:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return responses.pop(0)

    return FhirClient("http://fhir.test/fhir", transport=httpx.MockTransport(handler))


def _outcome(text: str) -> dict[str, object]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "diagnostics": text}],
    }


def test_a_transient_read_failure_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fhir_client, "_READ_RETRY_DELAYS_S", (0.0, 0.0))
    calls: list[str] = []
    client = _client(
        [httpx.Response(500, json=_outcome("boom")), httpx.Response(200, json={"id": "1"})], calls
    )
    assert client.read("Patient", "1") == {"id": "1"}
    assert calls == ["GET", "GET"]


def test_writes_are_not_retried_and_errors_map_onto_the_tree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fhir_client, "_READ_RETRY_DELAYS_S", (0.0, 0.0))
    calls: list[str] = []
    client = _client([httpx.Response(503, json=_outcome("down"))], calls)
    with pytest.raises(FhirUnavailableError, match="down"):
        client.create({"resourceType": "Patient"})
    assert calls == ["POST"]
    client = _client([httpx.Response(404, json=_outcome("gone"))], calls)
    with pytest.raises(NotFoundError):
        client.read("Patient", "x")
    client = _client([httpx.Response(422, json=_outcome("Observation.status: minimum 1"))], calls)
    with pytest.raises(FhirError, match=r"Observation\.status") as info:
        client.create({"resourceType": "Observation"})
    assert info.value.http_status == 422
