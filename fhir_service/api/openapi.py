"""What the service's OpenAPI document says about its FHIR endpoints.

The routes read their query parameters and bodies themselves (FHIR's rules, not FastAPI's),
so FastAPI cannot infer them; they are declared here, with every status a route answers and
the shape of each answer, so that clients — and the schema-driven fuzzing in
``tests/security`` — know the contract: a Bundle or CapabilityStatement on success, an
``OperationOutcome`` for every refusal, never anything else.
"""

from __future__ import annotations

from typing import Any

from fhir_service.api.responses import FHIR_JSON

OPERATION_OUTCOME: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"enum": ["fatal", "error", "warning", "information"]},
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                },
            },
        },
    },
}
SEARCHSET: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "type", "entry"],
    "properties": {
        "resourceType": {"const": "Bundle"},
        "type": {"const": "searchset"},
        "total": {"type": "integer", "minimum": 0},
        "entry": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["resource", "search"],
                "properties": {
                    "resource": {
                        "type": "object",
                        "properties": {"resourceType": {"const": "ImagingStudy"}},
                    },
                    "search": {
                        "type": "object",
                        "properties": {
                            "mode": {"const": "match"},
                            "score": {"type": "number", "minimum": 0, "maximum": 1},
                        },
                    },
                },
            },
        },
    },
}
COLLECTION: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "type", "entry"],
    "properties": {
        "resourceType": {"const": "Bundle"},
        "type": {"const": "collection"},
        "entry": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["fullUrl", "resource"],
                "properties": {"resource": {"type": "object", "required": ["resourceType"]}},
            },
        },
    },
}
_REASONS = {
    400: "bad input",
    401: "no or invalid credentials",
    403: "outside the caller's patient or scopes",
    404: "no such resource",
    413: "request body over its limit",
    422: "the input cannot be processed (no embedding, undecodable image)",
    500: "an error nobody foresaw (logged)",
    502: "the FHIR server failed",
    503: "the FHIR server is unavailable",
}


def _fhir(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {FHIR_JSON: {"schema": schema}}}


def responses(success: dict[str, Any], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """``success`` for 200, an OperationOutcome for each of ``statuses``."""
    out: dict[int | str, dict[str, Any]] = {200: _fhir(success, "success")}
    for status in statuses:
        out[status] = _fhir(OPERATION_OUTCOME, _REASONS[status])
    return out


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


SIMILAR_PARAMETERS = [
    _query("count", {"type": "integer", "minimum": 1, "maximum": 100}, "results"),
    _query("space", {"enum": ["clip", "densenet"]}, "embedding space"),
    _query("exclude-same-patient", {"enum": ["true", "false"]}, "leave out the patient"),
    _query("patient", {"type": "string", "pattern": "^(Patient/)?[A-Za-z0-9.-]{1,64}$"}, "only"),
    _query("gender", {"enum": ["male", "female", "other", "unknown"]}, "patient gender"),
    _query("view-position", {"enum": ["PA", "AP", "LL"]}, "view"),
    _query("age-min", {"type": "integer", "minimum": 0, "maximum": 150}, "youngest"),
    _query("age-max", {"type": "integer", "minimum": 0, "maximum": 150}, "oldest"),
    _query("finding", {"type": "string"}, "positive finding (label or code)"),
]
TEXT_PARAMETER = _query("text", {"type": "string", "minLength": 1, "maxLength": 1000}, "query")
PARAMETERS_BODY: dict[str, Any] = {
    "required": False,
    "content": {
        media: {
            "schema": {
                "type": "object",
                "required": ["resourceType"],
                "properties": {
                    "resourceType": {"const": "Parameters"},
                    "parameter": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "valueString": {"type": "string"},
                                "valueInteger": {"type": "integer"},
                                "valueBoolean": {"type": "boolean"},
                                "valueAttachment": {
                                    "type": "object",
                                    "properties": {
                                        "contentType": {"type": "string"},
                                        "data": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            }
        }
        for media in (FHIR_JSON, "application/json")
    },
}
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def notification_body(resource_type: str) -> dict[str, Any]:
    """The body HAPI's rest-hook PUTs: the resource that matched the Subscription."""
    return {
        "required": True,
        "content": {
            FHIR_JSON: {
                "schema": {
                    "type": "object",
                    "required": ["resourceType", "meta"],
                    "properties": {
                        "resourceType": {"const": resource_type},
                        "id": {"type": "string"},
                        "status": {"type": "string"},
                        "meta": {
                            "type": "object",
                            "properties": {"versionId": {"type": "string"}},
                        },
                    },
                }
            }
        },
    }


def notification_route(resource_type: str) -> dict[str, Any]:
    """Route keywords of a rest-hook endpoint: its body and every answer it gives."""
    return {
        "responses": responses(OPERATION_OUTCOME, 400, 401, 413),
        "openapi_extra": {"requestBody": notification_body(resource_type)},
    }


def similar_openapi(*, text: bool, body: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "parameters": [*SIMILAR_PARAMETERS, *([TEXT_PARAMETER] if text else [])],
        "security": BEARER,
    }
    if body:
        extra["requestBody"] = PARAMETERS_BODY
    return extra


def add_security_scheme(schema: dict[str, Any]) -> dict[str, Any]:
    """The bearer scheme ``$similar`` uses (the service key or a SMART access token)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the service key (CXR_SERVICE_API_KEY) or a SMART access token of a "
        "CXR_SIMILAR_ISSUERS issuer",
    }
    return schema
