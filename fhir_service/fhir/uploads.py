"""An image uploaded from the SMART app, as the study the pipeline reads (issue 18).

One transaction: an ``ImagingStudy`` (status ``available``, the launch's patient, modality
DX, started now) and the ``Media`` holding the pixels inline (``partOf`` the study), the
input shape of FHIR_PROFILE.md. The rest-hook Subscription then queues it like any study,
and the worker's input gate decides: a refused image becomes a failed Task with its reason.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

from fhir_service.fhir.datatypes import instant, ref
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology

__all__ = ["build_upload_transaction"]

_UPLOAD_SYSTEM = "urn:ietf:rfc:3986"


def build_upload_transaction(
    patient_id: str,
    image: bytes,
    content_type: str,
    *,
    uploaded: datetime,
    title: str,
    upload_id: str | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The ImagingStudy + Media transaction of one uploaded image for ``Patient/{id}``."""
    t = terminology
    key = upload_id or str(uuid.uuid4())
    study_urn, media_urn = f"urn:uuid:{key}", f"urn:uuid:{uuid.uuid5(uuid.UUID(key), 'media')}"
    when = instant(uploaded)
    modality = t.concept("modality_dx")
    study: Resource = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": _UPLOAD_SYSTEM, "value": study_urn}],
        "status": "available",
        "modality": [modality],
        "subject": ref(f"Patient/{patient_id}"),
        "started": when,
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "description": f"Uploaded chest X-ray ({title})"[:200],
    }
    media: Resource = {
        "resourceType": "Media",
        "status": "completed",
        "type": {"coding": [t.concept("media_type_image")]},
        "partOf": [ref(study_urn)],
        "subject": ref(f"Patient/{patient_id}"),
        "createdDateTime": when,
        "content": {
            "contentType": content_type,
            "data": base64.b64encode(image).decode("ascii"),
            "title": title[:200],
        },
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": study_urn,
                "resource": study,
                "request": {"method": "POST", "url": "ImagingStudy"},
            },
            {
                "fullUrl": media_urn,
                "resource": media,
                "request": {"method": "POST", "url": "Media"},
            },
        ],
    }
