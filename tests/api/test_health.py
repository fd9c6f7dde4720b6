"""/healthz says when the classifier or CLIP is untrained (no server needed: the HAPI and
database checks fail here and the answer is 'degraded', which is beside the point)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from cxr_errors import FhirUnavailableError
from fhir_service.api import health
from fhir_service.deps import _fhir, _settings
from fhir_service.settings import Settings


class _DownFhir:
    base_url = "http://127.0.0.1:9/fhir"

    def capability_statement(self) -> dict[str, object]:
        raise FhirUnavailableError("down")


def _client(settings: Settings) -> TestClient:
    app = FastAPI()
    app.include_router(health.router)
    app.dependency_overrides[_settings] = lambda: settings
    app.dependency_overrides[_fhir] = lambda: _DownFhir()
    return TestClient(app)


def test_untrained_clip_and_classifier_are_marked() -> None:
    settings = Settings(
        model_weights="untrained",
        clip_weights="untrained",
        database_url="postgresql://nobody@127.0.0.1:9/none",
    )
    body = _client(settings).get("/healthz").json()
    assert body["model"]["untrained"] is True and "UNTRAINED" in body["model"]["note"]
    assert body["clip"]["untrained"] is True and "UNTRAINED CLIP" in body["clip"]["note"]


def test_pretrained_clip_is_not_marked() -> None:
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:9/none")
    body = _client(settings).get("/healthz").json()
    assert body["clip"]["untrained"] is False and body["clip"]["note"] is None
