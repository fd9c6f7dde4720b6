"""Writes through the dev EHR's FHIR proxy: one transaction Bundle at the base, judged entry
by entry against the token's write scopes.

The cxr app writes two things with the user's token: a radiologist's review (Observations,
Provenance, the DiagnosticReport) and an uploaded study (ImagingStudy + Media). Both are
transactions, so the proxy accepts writes in that one form:

- ``POST {base}`` with a ``Bundle`` of type ``transaction``; every entry a ``POST {Type}``
  (needs ``c`` on the type) or ``PUT {Type}/{id}`` (needs ``u``) — no DELETE, PATCH,
  conditional update or nested Bundle;
- a patient token (patient context) writes only in its patient's compartment: every
  compartment resource written names the patient, a PUT may only replace a resource that is
  already the patient's (read and checked first), and a Provenance may only target entries
  of the same transaction (so it cannot vouch for another patient's data);
- a user token writes the types its ``user/`` scopes grant ``c``/``u`` on, across patients.

A token without the scopes gets 403 before anything reaches HAPI. ``Practitioner/{user}``
(the signed-in user, SMART's ``fhirUser``) is created in HAPI before the first write, since
reviews reference it and HAPI enforces referential integrity.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from fhir_service.dev_ehr.context import FHIR_JSON, DevEhr, is_fhir_id

log = logging.getLogger(__name__)

#: Entries a transaction through the proxy may hold, at most.
MAX_ENTRIES = 100
_PERMISSION = {"POST": "c", "PUT": "u"}


class WriteAccess(Protocol):
    """What the proxy knows of the token (:class:`fhir_service.dev_ehr.proxy.Access`)."""

    @property
    def patient(self) -> str | None: ...

    def permits(self, rtype: str, permission: str) -> bool: ...


#: ``GET {path}`` on HAPI → (status, body).
Reader = Callable[[str], Awaitable[tuple[int, dict[str, Any]]]]
#: Whether a resource is the patient's.
Belongs = Callable[[dict[str, Any], str], bool]


class WriteDenied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_transaction(body: bytes) -> dict[str, Any]:
    try:
        bundle = json.loads(body)
    except ValueError as exc:
        raise WriteDenied(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise WriteDenied(403, "writes go through the dev EHR as a transaction Bundle only")
    if bundle.get("type") != "transaction":
        raise WriteDenied(403, "only Bundle.type = transaction is accepted")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or len(entries) > MAX_ENTRIES:
        raise WriteDenied(400, f"a transaction needs 1 to {MAX_ENTRIES} entries")
    return bundle


def _entry_target(entry: Any) -> tuple[str, str, str | None, dict[str, Any]]:
    """(method, type, id for a PUT, resource) of one entry, or WriteDenied."""
    if not isinstance(entry, dict):
        raise WriteDenied(400, "a transaction entry is not an object")
    raw_request = entry.get("request")
    request: dict[str, Any] = raw_request if isinstance(raw_request, dict) else {}
    resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else None
    method = str(request.get("method", ""))
    url = str(request.get("url", ""))
    if method not in _PERMISSION or resource is None:
        raise WriteDenied(403, f"only POST and PUT of a resource are allowed, not {method} {url}")
    rtype = str(resource.get("resourceType", ""))
    if rtype == "Bundle":
        raise WriteDenied(403, "a nested Bundle is not allowed")
    if method == "POST":
        if url != rtype:
            raise WriteDenied(403, f"POST {url} does not create a {rtype}")
        return method, rtype, None, resource
    parts = url.split("/")
    if len(parts) != 2 or parts[0] != rtype or not is_fhir_id(parts[1]):
        raise WriteDenied(403, f"PUT {url}: only PUT {{Type}}/{{id}} of that type is allowed")
    if str(resource.get("id", parts[1])) != parts[1]:
        raise WriteDenied(400, f"PUT {url} carries a resource with another id")
    return method, rtype, parts[1], resource


def _internal_refs(entries: list[Any]) -> set[str]:
    refs = set()
    for entry in entries:
        if isinstance(entry, dict):
            if entry.get("fullUrl"):
                refs.add(str(entry["fullUrl"]))
            request = entry.get("request") or {}
            if isinstance(request, dict) and request.get("method") == "PUT":
                refs.add(str(request.get("url")))
    return refs


async def check_transaction(
    read: Reader,
    access: WriteAccess,
    bundle: dict[str, Any],
    *,
    compartment: Collection[str],
    belongs: Belongs,
) -> None:
    """WriteDenied unless every entry is within the token's write scopes (and, for a patient
    token, its patient)."""
    entries = bundle["entry"]
    internal = _internal_refs(entries)
    patient = access.patient
    for entry in entries:
        method, rtype, rid, resource = _entry_target(entry)
        if not access.permits(rtype, _PERMISSION[method]):
            what = "create" if method == "POST" else "update"
            raise WriteDenied(403, f"the token's scopes do not allow {what} of {rtype}")
        if patient is None:
            continue  # a user token, or (TEST-ONLY) the unfiltered mode
        if rtype == "Provenance":
            targets = [str((t or {}).get("reference", "")) for t in resource.get("target", [])]
            if not targets or not all(t in internal for t in targets):
                raise WriteDenied(403, "a Provenance may only target entries of its transaction")
            continue
        if rtype not in compartment:
            raise WriteDenied(403, f"{rtype} is not in the patient compartment")
        if not belongs(resource, patient):
            raise WriteDenied(403, f"the {rtype} written is not Patient/{patient}'s")
        if rid is not None:
            status, current = await read(f"{rtype}/{rid}")
            if status == 200 and not belongs(current, patient):
                raise WriteDenied(403, f"{rtype}/{rid} is outside the token's patient compartment")


async def ensure_user(ehr: DevEhr) -> None:
    """Create the signed-in user's Practitioner in HAPI once (reviews reference it)."""
    if ehr.user_ensured:
        return
    rtype, _, uid = ehr.settings.dev_ehr_user.partition("/")
    if rtype != "Practitioner" or not is_fhir_id(uid):
        return
    resp = await ehr.upstream.get(f"Practitioner/{uid}", headers={"Accept": FHIR_JSON})
    if resp.status_code != 200:
        practitioner = {
            "resourceType": "Practitioner",
            "id": uid,
            "active": True,
            "name": [{"text": "Dev Radiologist (cxr dev EHR)", "family": "Radiologist"}],
        }
        put = await ehr.upstream.put(
            f"Practitioner/{uid}",
            content=json.dumps(practitioner),
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
        )
        if put.status_code >= 300:
            log.warning("could not create Practitioner/%s: %s", uid, put.status_code)
            return
    ehr.user_ensured = True
