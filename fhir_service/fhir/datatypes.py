"""Small FHIR datatype builders shared by the resource builders: plain dicts, no HTTP."""

from __future__ import annotations

import uuid
from datetime import datetime

from fhir_service.fhir.identifiers import token_search_value
from fhir_service.fhir.terminology import Coding, Resource, Terminology

__all__ = [
    "cc",
    "conditional_create",
    "identifier_condition",
    "instant",
    "quantity",
    "ref",
    "rounded",
    "urn",
]

# uuid5 namespace of cxr-fhir's bundle placeholders; never change it, or re-runs of old
# inputs would produce different (though still idempotent) bundles.
_UUID_NAMESPACE = uuid.UUID("1f0c6d2e-4b7a-5e3c-9a1d-8c2b5f4e7a90")
_DECIMALS = 4


def urn(key: str, role: str) -> str:
    """A ``urn:uuid`` placeholder derived from ``key`` and ``role``: the same inputs always
    give the same bundle."""
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{key}/{role}')}"


def instant(ts: datetime) -> str:
    if ts.tzinfo is None or ts.utcoffset() is None:
        # FHIR instant requires a zone; a naive datetime would be read as server local time.
        raise ValueError("timestamps must be timezone-aware")
    return ts.isoformat(timespec="milliseconds")


def cc(coding: Coding, text: str | None = None) -> Resource:
    out: Resource = {"coding": [dict(coding)]}
    if text:
        out["text"] = text
    return out


def ref(reference: str, display: str | None = None) -> Resource:
    return {"reference": reference, **({"display": display} if display else {})}


def rounded(x: float) -> float:
    return round(float(x), _DECIMALS)


def quantity(x: float, terminology: Terminology) -> Resource:
    # UCUM "1": probabilities and logits are dimensionless.
    unit = terminology.concept("unit_one")
    return {"value": rounded(x), "system": unit["system"], "code": unit["code"]}


def conditional_create(full_url: str, resource: Resource, if_none_exist: str) -> Resource:
    """A transaction entry that creates ``resource`` unless ``if_none_exist`` matches."""
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": if_none_exist,
        },
    }


def identifier_condition(system: str, value: str) -> str:
    """``identifier=system|value`` for ``ifNoneExist`` and conditional URLs, escaped."""
    return "identifier=" + token_search_value(system, value)
