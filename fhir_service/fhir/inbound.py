"""Inbound resources checked against fhir.resources models at the edge.

What drives work (a rest-hook notification, the ImagingStudy a job reads, the Media holding
its pixels, an Endpoint) is validated here before anything acts on it, so a malformed
resource is refused with a message that names the field (``subject.reference: Input should
be a valid string``) instead of failing later with a KeyError. The code keeps working on
the plain dicts (see :mod:`fhir_service.fhir.client`); the models are the check.

Which models: fhir.resources 8 ships R5 (its default), R4B and STU3, and no R4. R4B is R4
plus technical corrections and a few new resources; ImagingStudy, Media, Endpoint, Bundle and
everything our builders write are unchanged between R4 and R4B, while R5 has no Media at all
and reshapes ImagingStudy. So R4 JSON is read with the R4B models, and the tests validate
every resource the builders write against the same models.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from cxr_errors import InputError

__all__ = [
    "MalformedResource",
    "check_resource",
    "validation_problems",
]

#: At most this many field problems are named in one message.
_MAX_PROBLEMS = 5


class MalformedResource(InputError):
    """The resource is not valid FHIR R4."""

    http_status = 400
    issue_code = "structure"


@cache
def _model(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except KeyError:
        return None


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(resource)"


def validation_problems(resource: Mapping[str, Any]) -> list[str]:
    """Every problem the R4B model finds, as ``field.path: message``; empty when valid."""
    kind = resource.get("resourceType")
    if not isinstance(kind, str) or not kind:
        return ["resourceType: missing"]
    model = _model(kind)
    if model is None:
        return [f"resourceType: {kind!r} is not a FHIR resource type"]
    try:
        model.model_validate(dict(resource))
    except ValidationError as exc:
        return [f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return []


def check_resource(
    resource: Any, expected: str | tuple[str, ...], *, what: str | None = None
) -> dict[str, Any]:
    """``resource`` as a dict when it is a valid resource of the ``expected`` type(s).

    Raises :class:`MalformedResource` naming the fields otherwise; ``what`` says where it
    came from in the message ("rest-hook body", "Media/12").
    """
    kinds = (expected,) if isinstance(expected, str) else expected
    label = what or " or ".join(kinds)
    if not isinstance(resource, Mapping):
        raise MalformedResource(f"{label} is not a FHIR resource (a JSON object)")
    kind = resource.get("resourceType")
    if kind not in kinds:
        raise MalformedResource(
            f"{label} is a {kind or 'resource without resourceType'}, not a {' or '.join(kinds)}"
        )
    problems = validation_problems(resource)
    if problems:
        more = (
            f" (and {len(problems) - _MAX_PROBLEMS} more)" if len(problems) > _MAX_PROBLEMS else ""
        )
        shown = "; ".join(problems[:_MAX_PROBLEMS])
        raise MalformedResource(f"{label} is not a valid FHIR {kind}: {shown}{more}")
    return dict(resource)
