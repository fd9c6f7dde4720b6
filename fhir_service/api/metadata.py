"""The service's own FHIR face: CapabilityStatement and the ``$similar`` OperationDefinition."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cxr_errors import NotFoundError
from fhir_service.api.openapi import responses
from fhir_service.api.responses import fhir_response
from fhir_service.deps import SettingsDep
from fhir_service.similar import DEFAULT_COUNT, MAX_TEXT
from vector_store.records import MAX_K

router = APIRouter(prefix="/fhir", tags=["metadata"])

OPERATION_ID = "ImagingStudy-it-similar"


def _param(
    name: str, ptype: str, doc: str, *, use: str = "in", min_: int = 0, max_: str = "1"
) -> dict[str, Any]:
    return {
        "name": name,
        "use": use,
        "min": min_,
        "max": max_,
        "type": ptype,
        "documentation": doc,
    }


def operation_definition(base: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationDefinition",
        "id": OPERATION_ID,
        "url": f"{base}/OperationDefinition/{OPERATION_ID}",
        "name": "Similar",
        "title": "Similar prior chest X-ray cases",
        "status": "active",
        "kind": "operation",
        "code": "similar",
        "affectsState": False,
        "resource": ["ImagingStudy"],
        "system": False,
        "type": True,
        "instance": True,
        "description": (
            "Cases similar to a stored study (instance level), to a text description or to "
            "an image that is not stored (type level), ranked by cosine similarity of CLIP "
            "or DenseNet embeddings."
        ),
        "parameter": [
            _param("text", "string", f"text query (CLIP space), at most {MAX_TEXT} characters"),
            _param("image", "Attachment", "query image (POST, inline data)"),
            _param("count", "integer", f"results, 1..{MAX_K} (default {DEFAULT_COUNT})"),
            _param("space", "code", "clip (default) | densenet"),
            _param("exclude-same-patient", "boolean", "leave out the query study's patient"),
            _param(
                "patient",
                "reference",
                "only this patient's studies (Patient id or Patient/{id}); a patient-scoped "
                "token always gets its own patient",
            ),
            _param("gender", "code", "male | female | other | unknown"),
            _param("view-position", "code", "PA | AP | LL"),
            _param("age-min", "integer", "youngest patient age at study, years"),
            _param("age-max", "integer", "oldest patient age at study, years"),
            _param("finding", "token", "only studies positive for this finding (label or code)"),
            _param(
                "return",
                "Bundle",
                "searchset; search.score = cosine similarity",
                use="out",
                min_=1,
            ),
        ],
    }


def capability_statement(base: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-27",
        "kind": "instance",
        "software": {"name": "cxr-fhir", "version": "0.1.0"},
        "implementation": {"description": "cxr-fhir similar-case search", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": "ImagingStudy",
                        "operation": [
                            {
                                "name": "similar",
                                "definition": f"{base}/OperationDefinition/{OPERATION_ID}",
                            }
                        ],
                    },
                    {"type": "OperationDefinition", "interaction": [{"code": "read"}]},
                ],
            }
        ],
    }


_RESOURCE = {"type": "object", "required": ["resourceType"]}


@router.get("/metadata", responses=responses(_RESOURCE))
def metadata(settings: SettingsDep) -> Any:
    return fhir_response(capability_statement(f"{settings.service_url}/fhir"))


@router.get("/OperationDefinition/{op_id}", responses=responses(_RESOURCE, 404))
def read_operation_definition(op_id: str, settings: SettingsDep) -> Any:
    if op_id != OPERATION_ID:
        raise NotFoundError(f"OperationDefinition/{op_id} is not known")
    return fhir_response(operation_definition(f"{settings.service_url}/fhir"))
