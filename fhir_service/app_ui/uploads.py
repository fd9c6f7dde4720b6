"""Upload-and-read from the app (issue 18): with write scopes, the image becomes an
ImagingStudy + Media of the launch's patient in the EHR (one transaction, the user's token),
and the normal pipeline reads it; the study page then shows its progress until the report
(or the failed Task's reason) is there."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from cxr_errors import FhirError, ForbiddenError
from fhir_service.app_ui.review import post_transaction
from fhir_service.app_ui.service import AppUi, outcome_text
from fhir_service.app_ui.session import AppSession
from fhir_service.fhir.uploads import build_upload_transaction

log = logging.getLogger(__name__)


def _created_study(response: dict[str, Any]) -> str | None:
    for entry in response.get("entry", []):
        location = str((entry.get("response") or {}).get("location", ""))
        parts = location.split("/_history")[0].split("/")
        if len(parts) >= 2 and parts[-2] == "ImagingStudy":
            return parts[-1]
    return None


async def upload(
    ui: AppUi, session: AppSession, image: bytes, content_type: str, name: str
) -> dict[str, Any]:
    access = ui.access(session)
    if access.mode != "patient" or access.patient is None:
        raise ForbiddenError("an upload needs a patient launch (the study's patient)")
    bundle = build_upload_transaction(
        access.patient, image, content_type, uploaded=datetime.now(UTC), title=name
    )
    t0 = time.perf_counter()
    status, body = await post_transaction(ui, session, bundle)
    elapsed_ms = (time.perf_counter() - t0) * 1000
    if status == 403:
        raise ForbiddenError(f"the EHR refused the upload: {outcome_text(body)}")
    if status >= 300:
        raise FhirError(f"the upload transaction answered {status}: {outcome_text(body)}")
    study = _created_study(body)
    if study is None:
        raise FhirError("the EHR did not say which ImagingStudy it created")
    log.info(
        "uploaded %s (%d bytes) as ImagingStudy/%s in %.0f ms", name, len(image), study, elapsed_ms
    )
    return {"study": study, "transaction_ms": elapsed_ms}
