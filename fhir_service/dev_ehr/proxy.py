"""The dev EHR's FHIR base (``{dev-ehr}/fhir``): a proxy in front of HAPI that enforces the
access token.

- No token, or one that is not a valid, unexpired, unrevoked access token signed by our key
  → 401 with ``WWW-Authenticate: Bearer`` (RFC 6750 §3).
- A token with a ``patient`` (patient context) is judged by its ``patient/`` scopes (v1 or
  v2), and the patient bounds what can be read: ``Patient/{pid}``; searches of compartment
  types get ``patient={pid}`` added, and any other patient in ``patient``/``subject`` is
  refused; single resources are checked against their subject after the fetch, and search
  bundles lose any entry outside the compartment (e.g. ``_include``/``_revinclude`` or
  ``$similar`` matches of other patients).
- A token without a ``patient`` (a user-level launch) is judged by its ``user/`` scopes: it
  reads and searches the resource types they grant, across patients (403 for any other
  type); bundles lose only entries of types not granted, so ``$similar`` answers whole. A
  chained search parameter must name each link's target type (``subject:Patient.name``),
  and the token must be granted search on it: a chain reads the type it passes through.
- Writes: a transaction Bundle ``POST``ed at the base, each entry judged against the token's
  ``c``/``u`` scopes and, for a patient token, its patient (:mod:`fhir_service.dev_ehr.writes`);
  every other write (a plain POST/PUT/PATCH/DELETE of a resource) is refused (403).
  ``ImagingStudy/$similar`` and ``ImagingStudy/{id}/$similar`` are allowed, GET or POST, as
  they do not change state; the token goes along to HAPI (whose forwarder passes it to the
  cxr service, which checks it again and keeps a patient token to its patient).
  ``_format``/``_pretty`` are dropped and ``_has``, ``_filter``,
  ``_query``, ``_contained`` refused whatever the token.
- ``metadata`` needs no token (FHIR), and carries SMART's oauth-uris extension.

``CXR_DEV_EHR_PROXY_FILTER=false`` (TEST-ONLY) turns the patient compartment off: a patient
token is still authenticated and judged by its ``patient/`` scopes, but its searches and reads
are passed on as asked and answered whole, as a SMART server is allowed to do. The app must
then keep to the launch's patient by itself, which the browser tests check.

HAPI's own URLs in the bodies (paging links, fullUrl) are rewritten to the proxy's, so a
client that follows ``next`` stays behind the proxy. HAPI itself has no authentication:
in a deployment it must not be reachable by the app except through a proxy like this one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fhir_service.dev_ehr import scopes, writes
from fhir_service.dev_ehr.context import FHIR_JSON, DevEhr, EhrDep, is_fhir_id
from fhir_service.dev_ehr.oauth import AUTHORIZE_PATH, TOKEN_PATH
from fhir_service.dev_ehr.tokens import AccessClaims, InvalidTokenError
from fhir_service.fhir.outcome import operation_outcome

log = logging.getLogger(__name__)

router = APIRouter()

REALM = "cxr-dev-ehr"
#: Where a resource of each compartment type names its patient (R4), and the search
#: parameters that select by it.
COMPARTMENT: dict[str, tuple[str, tuple[str, ...]]] = {
    "ImagingStudy": ("subject", ("patient", "subject")),
    "DiagnosticReport": ("subject", ("patient", "subject")),
    "Observation": ("subject", ("patient", "subject")),
    "Media": ("subject", ("patient", "subject")),
    "Task": ("for", ("patient", "subject")),
    "ServiceRequest": ("subject", ("patient", "subject")),
}
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]+")
# Parameters that make HAPI answer in another format or reach across compartments.
_DROPPED_PARAMS = {"_format", "_pretty"}
_REFUSED_PARAMS = {"_has", "_filter", "_query", "_contained", "_containedType"}


class Denied(Exception):
    def __init__(self, status: int, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error


def _challenge(error: str | None, description: str | None) -> str:
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}"'
    if description:
        value += ', error_description="{}"'.format(description.replace('"', "'"))
    return value


def _denied_response(exc: Denied) -> JSONResponse:
    code = "login" if exc.status == 401 else "forbidden"
    error = exc.error or ("insufficient_scope" if exc.status == 403 else None)
    return JSONResponse(
        operation_outcome(exc.message, code=code),
        status_code=exc.status,
        media_type=FHIR_JSON,
        headers={"WWW-Authenticate": _challenge(error, exc.message if error else None)},
    )


def authenticate(ehr: DevEhr, request: Request) -> AccessClaims:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Denied(401, "an access token is required (Authorization: Bearer …)")
    try:
        claims = ehr.tokens.verify_access_token(token.strip())
    except InvalidTokenError as exc:
        raise Denied(401, str(exc), error="invalid_token") from exc
    if claims.family and ehr.store.is_revoked(claims.family):
        raise Denied(401, "the token's grant was revoked", error="invalid_token")
    return claims


def patient_id_of(reference: str | None) -> str | None:
    """``pid`` from ``Patient/pid``, ``…/Patient/pid`` or ``Patient/pid/_history/n``."""
    if not reference:
        return None
    m = re.search(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$", reference)
    return m.group(1) if m else None


def belongs(resource: dict[str, Any], pid: str) -> bool:
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return resource.get("id") == pid
    if rtype not in COMPARTMENT:
        return False
    field, _ = COMPARTMENT[rtype]
    ref = resource.get(field)
    return isinstance(ref, dict) and patient_id_of(ref.get("reference")) == pid


def _value_is_patient(value: str, pid: str) -> bool:
    return value == pid or patient_id_of(value) == pid


def compartment_params(
    rtype: str, params: list[tuple[str, str]], pid: str
) -> list[tuple[str, str]]:
    """The search parameters with the patient compartment enforced (or Denied)."""
    out: list[tuple[str, str]] = []
    bound = False
    names = ("_id",) if rtype == "Patient" else COMPARTMENT[rtype][1]
    for key, value in params:
        name, _, modifier = key.partition(":")
        if name in _DROPPED_PARAMS:
            continue
        if name in _REFUSED_PARAMS:
            raise Denied(403, f"search parameter {name} is not allowed through the dev EHR")
        head = name.split(".")[0]
        if head in names:
            if "." in name or modifier not in ("", "Patient"):
                raise Denied(403, f"chained or modified {head} parameters are not allowed")
            if not all(_value_is_patient(v, pid) for v in value.split(",")):
                raise Denied(403, f"{key}={value} is outside the token's patient compartment")
            bound = True
        out.append((key, value))
    if not bound:
        out.append((names[0], pid))
    return out


@dataclass(frozen=True)
class Access:
    """What one access token may read: its patient's compartment through its ``patient/``
    scopes, or, without a patient (a user-level launch), any patient's resources of the
    types its ``user/`` scopes grant."""

    claims: AccessClaims
    #: False: the TEST-ONLY unfiltered mode (``CXR_DEV_EHR_PROXY_FILTER=false``).
    compartment: bool = True

    @property
    def patient(self) -> str | None:
        """The patient that bounds what the token reads (None: not bounded)."""
        return self.claims.patient if self.compartment else None

    @property
    def context(self) -> scopes.Context:
        return "user" if self.claims.patient is None else "patient"

    def permits(self, rtype: str, permission: str) -> bool:
        return scopes.permits(self.claims.scopes, rtype, permission, context=self.context)

    def sees(self, resource: dict[str, Any]) -> bool:
        """Whether ``resource`` may be passed on: its type granted, and in the compartment."""
        if not self.permits(str(resource.get("resourceType", "")), "r"):
            return False
        return self.patient is None or belongs(resource, self.patient)

    def __str__(self) -> str:
        if self.claims.patient:
            return f"Patient/{self.claims.patient}"
        return f"user {self.claims.subject}"


def user_params(params: list[tuple[str, str]], access: Access) -> list[tuple[str, str]]:
    """Search parameters of a user-level token (or Denied): no compartment to bind, but a
    chain may only pass through types the token may search."""
    out: list[tuple[str, str]] = []
    for key, value in params:
        links = key.split(".")
        name = links[0].partition(":")[0]
        if name in _DROPPED_PARAMS:
            continue
        if name in _REFUSED_PARAMS:
            raise Denied(403, f"search parameter {name} is not allowed through the dev EHR")
        for link in links[:-1]:
            target = link.partition(":")[2]
            if not _RESOURCE_TYPE.fullmatch(target):
                raise Denied(
                    403,
                    f"chained parameter {key}: name each link's target type "
                    "(e.g. subject:Patient.name) so its scope can be checked",
                )
            if not access.permits(target, "s"):
                raise Denied(403, f"{key} searches {target}, which the token's scopes do not allow")
        out.append((key, value))
    return out


def filter_bundle(bundle: dict[str, Any], access: Access) -> dict[str, Any]:
    kept = []
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        rtype = resource.get("resourceType", "")
        outcome = entry.get("search", {}).get("mode") == "outcome" or rtype == "OperationOutcome"
        if outcome or access.sees(resource):
            kept.append(entry)
    dropped = len(bundle.get("entry", [])) - len(kept)
    if dropped:
        log.info("withheld %d bundle entries not readable by %s", dropped, access)
        bundle = {k: v for k, v in bundle.items() if k != "total"}
        bundle["entry"] = kept
    return bundle


class Upstream:
    """One HAPI request: forwarded, URL-rewritten, parsed."""

    def __init__(self, ehr: DevEhr) -> None:
        self.ehr = ehr

    async def call(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]],
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        authorization: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Accept": FHIR_JSON}
        if content_type:
            headers["Content-Type"] = content_type
        if authorization:
            headers["Authorization"] = authorization
        try:
            resp = await self.ehr.upstream.request(
                method, path, params=httpx.QueryParams(list(params)), content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            log.warning("FHIR server unreachable: %s", exc)
            raise Denied(502, f"the FHIR server is unavailable: {exc}") from exc
        hapi_base = self.ehr.settings.fhir_base_url
        text = resp.text.replace(hapi_base, self.ehr.fhir_base)
        try:
            parsed = json.loads(text) if text else {}
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise Denied(502, f"the FHIR server answered {resp.status_code} with a non-JSON body")
        return resp.status_code, parsed


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


@router.get("/fhir/metadata")
async def metadata(ehr: EhrDep) -> JSONResponse:
    try:
        status, body = await Upstream(ehr).call("GET", "metadata", [])
    except Denied as exc:
        return _fhir(operation_outcome(exc.message, code="transient"), exc.status)
    for rest in body.get("rest", []):
        rest["security"] = {
            "service": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                            "code": "SMART-on-FHIR",
                        }
                    ]
                }
            ],
            "extension": [
                {
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "authorize", "valueUri": ehr.issuer + AUTHORIZE_PATH},
                        {"url": "token", "valueUri": ehr.issuer + TOKEN_PATH},
                    ],
                }
            ],
        }
    return _fhir(body, status)


@router.api_route("/fhir", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], response_model=None)
@router.api_route(
    "/fhir/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], response_model=None
)
async def fhir_proxy(request: Request, ehr: EhrDep, path: str = "") -> Response:
    try:
        claims = authenticate(ehr, request)
        return await _proxy(ehr, request, claims, path)
    except Denied as exc:
        if exc.status not in (401, 403):
            return _fhir(operation_outcome(exc.message, code="transient"), exc.status)
        return _denied_response(exc)


def _require(access: Access, rtype: str, permission: str) -> None:
    if not access.permits(rtype, permission):
        what = "read" if permission == "r" else "search"
        raise Denied(403, f"the token's scopes do not allow {what} of {rtype}")


async def _read_checked(up: Upstream, access: Access, path: str) -> tuple[int, dict[str, Any]]:
    status, body = await up.call("GET", path, [])
    if status == 200 and access.patient is not None and not belongs(body, access.patient):
        raise Denied(403, f"{path} is outside the token's patient compartment")
    return status, body


def _search_params(
    access: Access, rtype: str, params: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    if access.patient is not None:
        return compartment_params(rtype, params, access.patient)
    # A user token, or (TEST-ONLY, unfiltered) a patient token: as asked, less the refused.
    return user_params(params, access)


async def _similar(
    up: Upstream,
    access: Access,
    request: Request,
    segments: list[str],
    params: list[tuple[str, str]],
) -> Response:
    method = request.method
    if method not in ("GET", "POST"):
        raise Denied(403, "$similar is GET or POST")
    _require(access, "ImagingStudy", "s")
    if len(segments) == 3:
        _require(access, "ImagingStudy", "r")
        status, body = await _read_checked(up, access, f"ImagingStudy/{segments[1]}")
        if status != 200:
            return _fhir(body, status)
    sim_body = await request.body() if method == "POST" else None
    status, body = await up.call(
        method,
        "/".join(segments),
        [(k, v) for k, v in params if k not in _DROPPED_PARAMS],
        body=sim_body,
        content_type=request.headers.get("content-type"),
        # The service behind HAPI checks the token itself and bounds $similar to the
        # token's patient; HAPI's forwarder passes it on.
        authorization=request.headers.get("authorization"),
    )
    return _fhir(filter_bundle(body, access) if status == 200 else body, status)


async def _transaction(ehr: DevEhr, up: Upstream, access: Access, request: Request) -> Response:
    try:
        bundle = writes.parse_transaction(await request.body())

        async def read(path: str) -> tuple[int, dict[str, Any]]:
            return await up.call("GET", path, [])

        await writes.check_transaction(
            read, access, bundle, compartment=COMPARTMENT, belongs=belongs
        )
    except writes.WriteDenied as exc:
        if exc.status == 403:
            raise Denied(403, exc.message) from exc
        return _fhir(operation_outcome(exc.message, code="invalid"), exc.status)
    await writes.ensure_user(ehr)
    status, body = await up.call(
        "POST", "", [], body=json.dumps(bundle).encode(), content_type=FHIR_JSON
    )
    log.info(
        "transaction by %s: %d entries, HAPI answered %d", access, len(bundle["entry"]), status
    )
    return _fhir(body, status)


async def _proxy(ehr: DevEhr, request: Request, claims: AccessClaims, path: str) -> Response:
    access = Access(claims, compartment=ehr.settings.dev_ehr_proxy_filter)
    if claims.patient is None and not scopes.scopes_in(claims.scopes, "user"):
        raise Denied(403, "the token has no patient context and no user/ scopes")
    up = Upstream(ehr)
    method = request.method
    segments = [s for s in path.split("/") if s]
    params = list(request.query_params.multi_items())

    if not segments and method == "POST":
        return await _transaction(ehr, up, access, request)
    if not segments:
        # Only HAPI's paging links live at the base; their entries are filtered like a search.
        if method == "GET" and any(k == "_getpages" for k, _ in params):
            status, body = await up.call("GET", "", params)
            return _fhir(filter_bundle(body, access) if status == 200 else body, status)
        raise Denied(403, "only reads and searches are allowed through the dev EHR")

    rtype = segments[0]
    type_level_op = segments[1:] == ["$similar"] and rtype == "ImagingStudy"
    well_formed = _RESOURCE_TYPE.fullmatch(rtype) and all(is_fhir_id(s) for s in segments[1:2])
    if not (well_formed or type_level_op):
        raise Denied(403, f"{path} is not a read or search this dev EHR allows")

    if rtype == "ImagingStudy" and segments[-1] == "$similar" and len(segments) in (2, 3):
        return await _similar(up, access, request, segments, params)

    if method != "GET":
        raise Denied(403, "writes go through the dev EHR as one transaction Bundle at the base")
    if claims.patient is not None and rtype != "Patient" and rtype not in COMPARTMENT:
        raise Denied(403, f"{rtype} is not in the patient compartment this dev EHR serves")

    if len(segments) == 1:
        _require(access, rtype, "s")
        status, body = await up.call("GET", rtype, _search_params(access, rtype, params))
        return _fhir(filter_bundle(body, access) if status == 200 else body, status)
    if len(segments) == 2 or (
        len(segments) == 4 and segments[2] == "_history" and is_fhir_id(segments[3])
    ):
        _require(access, rtype, "r")
        if rtype == "Patient" and access.patient is not None and segments[1] != access.patient:
            raise Denied(403, f"Patient/{segments[1]} is not the token's patient")
        status, body = await _read_checked(up, access, "/".join(segments))
        return _fhir(body, status)
    raise Denied(403, f"{path} is not a read or search this dev EHR allows")
