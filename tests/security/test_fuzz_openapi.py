"""Schemathesis over the running service's own OpenAPI document: generated requests, valid
and deliberately invalid, for every FHIR endpoint; none may answer 5xx, and every answer must
match what the document declares (status, content type, body schema).

Bounded (``EXAMPLES`` per operation and mode, no shrinking database) so the whole module runs
in well under a minute against the real stack. The ``$similar`` calls carry the service key
(so generation reaches past authentication) and the rest-hook calls the subscription secret
(so their bodies are parsed); the unauthenticated paths are probed in ``test_probes``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from subscriptions.bootstrap import SECRET_HEADER
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

EXAMPLES = 12
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
#: Operations fuzzed: everything that takes input. /healthz takes none (and answers 503 by
#: design when a dependency is down).
SKIP = {"GET /healthz"}
#: Operations with no input that a schema can call invalid.
NOT_NEGATABLE = {"GET /fhir/metadata", "GET /fhir/OperationDefinition/{op_id}", "GET /metrics"}


@pytest.fixture(scope="module")
def schema(stack: Stack) -> Any:
    # The first text query loads CLIP into the service (seconds; minutes on a busy machine):
    # done here, so that the fuzzing's timeouts measure answers, not the model load.
    warm = httpx.get(
        f"{stack.settings.service_url}/fhir/ImagingStudy/$similar",
        params={"text": "warm up"},
        headers=_headers(stack, "$similar"),
        timeout=600,
    )
    assert warm.status_code == 200, warm.text
    raw = httpx.get(f"{stack.settings.service_url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(raw)


def _operations(schema: Any) -> list[Any]:
    return [op.ok() for op in schema.get_all_operations() if op.ok().label not in SKIP]


def _headers(stack: Stack, label: str) -> dict[str, str]:
    if "/hook/" in label:
        return {SECRET_HEADER: stack.settings.subscription_secret}
    return {"Authorization": f"Bearer {stack.settings.service_api_key}"}


def _fuzz(stack: Stack, operation: Any, mode: GenerationMode, calls: dict[str, int]) -> None:
    headers = _headers(stack, operation.label)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=stack.settings.service_url, headers=headers, timeout=60)
        calls[operation.label] = calls.get(operation.label, 0) + 1
        case.validate_response(response, checks=CHECKS)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_a_5xx_or_breaks_the_contract(
    stack: Stack, schema: Any, mode: GenerationMode
) -> None:
    operations = _operations(schema)
    assert {op.label for op in operations} >= {
        "PUT /hook/ImagingStudy/{study_id}",
        "GET /fhir/ImagingStudy/{study_id}/$similar",
        "POST /fhir/ImagingStudy/$similar",
    }
    calls: dict[str, int] = {}
    for operation in operations:
        try:
            _fuzz(stack, operation, mode, calls)
        except Unsatisfiable:
            # Nothing of it can be made invalid (no parameters, or only unconstrained ones).
            assert mode is GenerationMode.NEGATIVE and operation.label in NOT_NEGATABLE
    fuzzed = {op.label for op in operations}
    if mode is GenerationMode.NEGATIVE:
        fuzzed -= NOT_NEGATABLE
    assert set(calls) >= fuzzed, calls
