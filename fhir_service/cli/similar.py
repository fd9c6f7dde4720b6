"""``cxr similar``: ask the running service for similar cases and print a ranked table."""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.table import Table

from cxr_errors import FhirError, FhirUnavailableError, InputError
from fhir_service.cli._common import cli_errors, console
from fhir_service.fhir.outcome import outcome_text
from fhir_service.settings import get_settings


def register(app: typer.Typer) -> None:
    app.command()(similar)


def similar(
    study_id: str | None = typer.Argument(None, help="ImagingStudy id to find cases like."),
    text: str | None = typer.Option(None, "--text", help="Describe the case instead (CLIP)."),
    image: Path | None = typer.Option(None, "--image", help="Query with an image file."),
    count: int = typer.Option(10, help="How many results (1-100)."),
    space: str = typer.Option("clip", help="clip | densenet"),
    exclude_same_patient: bool = typer.Option(False, help="Leave out the patient's own studies."),
    gender: str | None = typer.Option(None, help="male | female | other | unknown"),
    view_position: str | None = typer.Option(None, help="PA | AP | LL"),
    age_min: int | None = typer.Option(None),
    age_max: int | None = typer.Option(None),
    finding: str | None = typer.Option(None, help="Only studies positive for this finding."),
) -> None:
    """Similar prior cases by study, text or image (calls the service's $similar)."""
    settings = get_settings()
    with cli_errors():
        if sum(x is not None for x in (study_id, text, image)) != 1:
            raise InputError("give exactly one of STUDY_ID, --text or --image")
        params: dict[str, Any] = {"count": count, "space": space}
        for name, value in (
            ("gender", gender),
            ("view-position", view_position),
            ("age-min", age_min),
            ("age-max", age_max),
            ("finding", finding),
            ("exclude-same-patient", "true" if exclude_same_patient else None),
        ):
            if value is not None:
                params[name] = value
        bundle = _ask(settings.service_url, settings.service_api_key, params, study_id, text, image)
    _print(bundle, space)


def _ask(
    service_url: str,
    key: str,
    params: dict[str, Any],
    study_id: str | None,
    text: str | None,
    image: Path | None,
) -> dict[str, Any]:
    """The service's ``$similar`` searchset for one of the three kinds of query."""
    base = f"{service_url}/fhir/ImagingStudy"
    # The service's own key: the CLI is a trusted system caller (CXR_SERVICE_API_KEY).
    auth = {"Authorization": f"Bearer {key}"}
    try:
        if image is not None:
            r = httpx.post(
                f"{base}/$similar",
                params=params,
                json=_image_parameters(image),
                headers=auth,
                timeout=120,
            )
        elif text is not None:
            r = httpx.get(
                f"{base}/$similar", params={**params, "text": text}, headers=auth, timeout=60
            )
        else:
            r = httpx.get(f"{base}/{study_id}/$similar", params=params, headers=auth, timeout=60)
    except httpx.TransportError as exc:
        raise FhirUnavailableError(
            f"the service at {service_url} is not reachable ({exc}); "
            "start it with `cxr serve` (or `make demo`)"
        ) from exc
    try:
        body: dict[str, Any] = r.json()
    except ValueError:
        body = {}
    if r.status_code >= 400:
        detail = outcome_text(body) if body else r.text[:200]
        raise FhirError(f"$similar → {r.status_code}: {detail}")
    return body


def _image_parameters(image: Path) -> dict[str, Any]:
    """A Parameters resource carrying ``image`` as an inline attachment."""
    ctype = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    if image.suffix.lower() == ".dcm":
        ctype = "application/dicom"
    data = base64.b64encode(image.read_bytes()).decode()
    attachment = {"contentType": ctype, "data": data}
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": "image", "valueAttachment": attachment}],
    }


def _print(bundle: dict[str, Any], space: str) -> None:
    tags = [t.get("code") for t in bundle.get("meta", {}).get("tag", [])]
    untrained = any("untrained" in str(code).lower() for code in tags)
    title = f"similar cases ({space})" + (
        " — UNTRAINED model: ranking is noise" if untrained else ""
    )
    table = Table(title=title)
    for col in ("rank", "ImagingStudy", "score", "description", "subject"):
        table.add_column(col)
    for rank, entry in enumerate(bundle.get("entry", []), 1):
        res = entry["resource"]
        table.add_row(
            str(rank),
            f"ImagingStudy/{res['id']}",
            f"{entry['search']['score']:.4f}",
            res.get("description", ""),
            res.get("subject", {}).get("reference", ""),
        )
    console.print(table)
