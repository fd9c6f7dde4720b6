"""The ``$analyze`` operation: one uploaded image read by the model, nothing saved.

For a caller that may not write to the record (a SMART launch without the write scopes) the
app still reads an image: ``POST {service}/fhir/$analyze`` with a ``Parameters`` body holding
``image`` (an Attachment: PNG, JPEG or DICOM, inline) and optionally ``patient``. The image
passes the same limits and input gate as the pipeline (a refusal is a 422 with the gate's
reason), is analysed by the same code path as the worker (DenseNet, heatmaps of positive
findings; no CLIP, since nothing is embedded or stored), and comes back as a ``collection``
Bundle tagged ``not-saved`` (:mod:`fhir_service.fhir.adhoc`).

Framework-free, like :mod:`fhir_service.similar`: the route only authenticates and parses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cxr_errors import ForbiddenError, InputError
from fhir_service.fhir.adhoc import unsaved_analysis_bundle
from fhir_service.fhir.terminology import Resource
from fhir_service.runtime import LazyModels
from fhir_service.similar import check_image_type, params_from_resource, patient_id
from subscriptions.analyzer import ModelAnalyzer

__all__ = ["AdhocAnalysis", "AnalyzeRequest", "parse_analyze"]


@dataclass(frozen=True)
class AnalyzeRequest:
    image: bytes
    patient: str | None = None
    """a Patient id the result is about (none: the result has no subject)"""


def parse_analyze(body: Any) -> AnalyzeRequest:
    params, image, image_type = params_from_resource(body)
    unknown = sorted(set(params) - {"patient"})
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(unknown)}; allowed: image, patient")
    if image is None:
        raise InputError(
            "$analyze needs an 'image' parameter: an Attachment with contentType and inline data"
        )
    check_image_type(image_type)
    return AnalyzeRequest(image=image, patient=patient_id(params.get("patient")))


class AdhocAnalysis:
    """Runs :class:`AnalyzeRequest` on the service's own classifier (loaded once, shared with
    image ``$similar``)."""

    def __init__(self, models: LazyModels) -> None:
        self._models = models

    def run(self, request: AnalyzeRequest, *, bound_patient: str | None = None) -> Resource:
        """``bound_patient`` (a patient-context caller) is the only patient it may name."""
        patient = request.patient
        if bound_patient is not None:
            if patient not in (None, bound_patient):
                raise ForbiddenError(f"this token may analyse for Patient/{bound_patient} only")
            patient = bound_patient
        analyzer = ModelAnalyzer(self._models.classifier(), None)
        result = analyzer.analyze(request.image, "the uploaded image")
        return unsaved_analysis_bundle(
            result.analysis,
            result.heatmaps,
            image_sha256=hashlib.sha256(request.image).hexdigest(),
            recorded=datetime.now(UTC),
            patient=f"Patient/{patient}" if patient else None,
        )
