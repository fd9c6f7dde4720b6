"""Dependencies injected into routes through ``Annotated`` aliases; routes build no clients."""

from __future__ import annotations

from typing import Annotated

import procrastinate
from fastapi import Depends, Request

from fhir_service.analyze import AdhocAnalysis
from fhir_service.api.auth import SimilarAuth
from fhir_service.fhir.client import FhirClient
from fhir_service.settings import Settings
from fhir_service.similar import SimilarService
from subscriptions.metrics import ServiceMetrics


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _fhir(request: Request) -> FhirClient:
    fhir: FhirClient = request.app.state.fhir
    return fhir


def _queue(request: Request) -> procrastinate.App:
    queue: procrastinate.App = request.app.state.queue
    return queue


def _similar(request: Request) -> SimilarService:
    service: SimilarService = request.app.state.similar
    return service


def _analyze(request: Request) -> AdhocAnalysis:
    analysis: AdhocAnalysis = request.app.state.analyze
    return analysis


def _auth(request: Request) -> SimilarAuth:
    auth: SimilarAuth = request.app.state.similar_auth
    return auth


def _metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
FhirDep = Annotated[FhirClient, Depends(_fhir)]
QueueDep = Annotated[procrastinate.App, Depends(_queue)]
SimilarDep = Annotated[SimilarService, Depends(_similar)]
AnalyzeDep = Annotated[AdhocAnalysis, Depends(_analyze)]
AuthDep = Annotated[SimilarAuth, Depends(_auth)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
