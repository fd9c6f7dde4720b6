"""Analytics for clinical informatics: cxr-fhir's AI findings as pandas DataFrames.

A small Python API over the ``fhirclient`` package (SMART Health IT's FHIR client)::

    from fhir_service.analytics import findings_frame

    df = findings_frame("http://127.0.0.1:8080/fhir", code="Pneumothorax")
    df[(df.flag == "POS") & ~df.untrained]

One row per AI Observation (``meta.security`` AIAST) the worker wrote; the columns and
filters are documented on :func:`findings_frame`, the supported authorizations (open server,
bearer token, SMART Backend Services, client secret, SMART standalone launch) in
:mod:`fhir_service.analytics.auth`. Rows of the untrained test model carry
``untrained=True``: they are not findings.
"""

from fhir_service.analytics.auth import (
    Auth,
    BackendServices,
    BearerToken,
    ClientSecret,
    StandaloneLaunch,
    connect,
    smart_configuration,
)
from fhir_service.analytics.frame import COLUMNS, LIVE_STATUSES, findings_frame, findings_search

__all__ = [
    "COLUMNS",
    "LIVE_STATUSES",
    "Auth",
    "BackendServices",
    "BearerToken",
    "ClientSecret",
    "StandaloneLaunch",
    "connect",
    "findings_frame",
    "findings_search",
    "smart_configuration",
]
