"""The ``cxr serve`` FastAPI application: rest-hook receiver, health, ``$similar``, metadata and
the SMART app, on one origin."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry

from cxr_errors import CxrError
from fhir_service.analyze import AdhocAnalysis
from fhir_service.api import analyze, health, hook, image_hook, metadata, metrics, similar
from fhir_service.api.auth import SimilarAuth
from fhir_service.api.headers import SecurityHeaders
from fhir_service.api.limits import BodyLimit
from fhir_service.api.openapi import add_security_scheme
from fhir_service.api.responses import (
    cxr_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from fhir_service.app_ui import router as app_ui_router
from fhir_service.fhir.client import FhirClient
from fhir_service.ops.database import database_url
from fhir_service.runtime import LazyModels, ModelQueryEncoder, model_version_for
from fhir_service.settings import Settings
from fhir_service.similar import SimilarService
from subscriptions.bootstrap import ensure_subscriptions
from subscriptions.metrics import MergedCollector, QueueCollector, ServiceMetrics
from subscriptions.queue import PROCESS_TASK, apply_schema, make_app
from vector_store.migrate import migrate
from vector_store.store import VectorStore

log = logging.getLogger(__name__)


def _bootstrap_subscriptions(settings: Settings) -> None:
    """Make sure HAPI's Subscriptions to our hooks exist and are active. Its own client with a
    long timeout: the first write to a freshly booted HAPI (validation support warming up)
    can take far longer than a request should."""
    with FhirClient(settings.fhir_base_url, timeout=120) as boot:
        subs = ensure_subscriptions(
            boot, f"{settings.service_url}/hook", settings.subscription_secret
        )
    for sub in subs:
        log.info("Subscription/%s is %s", sub["id"], sub["status"])


def create_app(settings: Settings, *, bootstrap_subscription: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dsn = database_url(settings)
        await asyncio.to_thread(apply_schema, dsn)
        queue = make_app(dsn)
        app.state.settings = settings
        app.state.fhir = FhirClient(settings.fhir_base_url, timeout=10)
        app.state.queue = queue
        app.state.models = LazyModels(settings)
        app.state.metrics = ServiceMetrics()
        app.state.metrics_registry = registry = CollectorRegistry(auto_describe=False)
        registry.register(MergedCollector(dsn, app.state.metrics.registry))
        registry.register(QueueCollector(dsn, PROCESS_TASK))
        store = VectorStore(dsn, ef_search=settings.search_ef)
        await asyncio.to_thread(migrate, dsn)
        app.state.similar_auth = SimilarAuth(settings)
        app.state.similar = SimilarService(
            fhir=app.state.fhir,
            store=store,
            model_version=await asyncio.to_thread(model_version_for, settings),
            encoder=ModelQueryEncoder(app.state.models),
        )
        app.state.analyze = AdhocAnalysis(app.state.models)
        async with queue.open_async():
            if bootstrap_subscription:
                await asyncio.to_thread(_bootstrap_subscriptions, settings)
            yield
        app.state.fhir.close()
        await app.state.similar_auth.aclose()
        store.close()

    app = FastAPI(title="cxr-fhir", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit_for=settings.request_limit)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(CxrError, cxr_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(hook.router)
    app.include_router(image_hook.router)
    app.include_router(metrics.router)
    app.include_router(health.router)
    app.include_router(similar.router)
    app.include_router(analyze.router)
    app.include_router(metadata.router)
    app.include_router(app_ui_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_security_scheme(
                get_openapi(title=app.title, version=app.version, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
