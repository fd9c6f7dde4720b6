"""A thin FHIR R4 REST client over httpx. Resources are plain dicts (JSON as FHIR defines it).

Resources travel as dicts: HAPI validates every write against R4, and the builders stay small
and explicit. Inbound resources that drive work are checked against fhir.resources models at
the edge (:mod:`fhir_service.fhir.inbound`), and the builders' output is validated against the
same models in the tests.

Errors map onto the exception tree: 404 → NotFoundError, other 4xx → FhirError with
HAPI's OperationOutcome diagnostics, 5xx / timeouts / refused connections →
FhirUnavailableError (the caller may retry).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from cxr_errors import FhirError, FhirUnavailableError, NotFoundError
from fhir_service.fhir.outcome import outcome_text

FHIR_JSON = "application/fhir+json"
_READ_RETRY_DELAYS_S = (0.5, 2.0)
Resource = dict[str, Any]


class FhirClient:
    """Synchronous client for one FHIR base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            timeout=timeout,
            headers={"Accept": FHIR_JSON, **(headers or {})},
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        hdrs = dict(headers or {})
        if json is not None:
            hdrs.setdefault("Content-Type", FHIR_JSON)
        # Reads are idempotent: a transient failure (5xx, dropped connection) is retried a
        # couple of times here rather than failing a whole job or page walk. Writes are not.
        attempts = len(_READ_RETRY_DELAYS_S) + 1 if method == "GET" else 1
        for attempt in range(attempts):
            try:
                response = self._http.request(
                    method, path.lstrip("/"), json=json, params=params, headers=hdrs
                )
                if response.status_code >= 400:
                    self._raise(method, path, response)
                return response
            except httpx.TimeoutException as exc:
                error = FhirUnavailableError(f"FHIR server timed out: {method} {path}")
                error.__cause__ = exc
            except httpx.TransportError as exc:
                error = FhirUnavailableError(f"FHIR server unreachable at {self.base_url}: {exc}")
                error.__cause__ = exc
            except FhirUnavailableError as exc:
                error = exc
            if attempt < attempts - 1:
                time.sleep(_READ_RETRY_DELAYS_S[attempt])
        raise error

    def _raise(self, method: str, path: str, response: httpx.Response) -> None:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        what = f"{method} {path} → {response.status_code}: {outcome_text(body)}"
        if response.status_code == 404 or response.status_code == 410:
            raise NotFoundError(what)
        if response.status_code >= 500:
            raise FhirUnavailableError(what)
        err = FhirError(what)
        err.http_status = response.status_code
        raise err

    # --- REST interactions -----------------------------------------------------------------

    def read(self, resource_type: str, rid: str) -> Resource:
        return dict(self.request("GET", f"{resource_type}/{rid}").json())

    def read_reference(self, reference: str) -> Resource:
        """Read ``Type/id`` (relative) or an absolute URL under this server's base."""
        if reference.startswith(self.base_url + "/"):
            reference = reference[len(self.base_url) + 1 :]
        if reference.startswith(("http://", "https://")):
            raise FhirError(f"reference outside this FHIR server refused: {reference}")
        return dict(self.request("GET", reference).json())

    def create(self, resource: Resource, *, if_none_exist: str | None = None) -> Resource:
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        headers = {**(headers or {}), "Prefer": "return=representation"}
        return dict(
            self.request("POST", resource["resourceType"], json=resource, headers=headers).json()
        )

    def update(self, resource: Resource, *, if_match: str | None = None) -> Resource:
        """PUT the resource; with ``if_match`` (a version id) only if that is still the current
        version — a concurrent writer's newer version makes HAPI answer 409/412, not lose it."""
        path = f"{resource['resourceType']}/{resource['id']}"
        headers = {"Prefer": "return=representation"}
        if if_match is not None:
            headers["If-Match"] = f'W/"{if_match}"'
        return dict(self.request("PUT", path, json=resource, headers=headers).json())

    def search(self, resource_type: str, params: Mapping[str, Any] | None = None) -> Resource:
        """One page of a search: the searchset Bundle."""
        return dict(self.request("GET", resource_type, params=params).json())

    def search_all(
        self, resource_type: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[Resource]:
        """Every matching resource (``search.mode=match``), following ``next`` links."""
        bundle = self.search(resource_type, params)
        while True:
            for entry in bundle.get("entry", []):
                if entry.get("search", {}).get("mode", "match") == "match":
                    yield entry["resource"]
            nxt = next(
                (lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None
            )
            if not nxt:
                return
            bundle = dict(self.request("GET", nxt.replace(self.base_url + "/", "")).json())

    def count(self, resource_type: str, params: Mapping[str, Any] | None = None) -> int:
        bundle = self.search(resource_type, {**(params or {}), "_summary": "count"})
        return int(bundle.get("total", 0))

    def transaction(self, bundle: Resource) -> Resource:
        return dict(self.request("POST", "", json=bundle).json())

    def capability_statement(self) -> Resource:
        return dict(self.request("GET", "metadata").json())
