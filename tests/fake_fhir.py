"""A small in-memory FHIR server behind ``httpx.MockTransport``, for unit tests of the job.

It keeps resources by type and id with versions and ``meta.lastUpdated``, and answers the
interactions the middle floor uses: read, create (``If-None-Exist``), update, transaction
(PUT and conditional POST entries, ``urn:uuid`` placeholders resolved) and the searches the
job runs — by ``identifier`` (``system|value``, OR-lists, ``system|`` alone), ``status``,
``part-of``, ``derived-from``, ``focus``, ``result:Observation.derived-from`` and
``_summary=count``. Anything else is a 400, so a test notices when the code asks for more.
Not a FHIR server: no validation, no paging.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import httpx

from fhir_service.fhir.client import FhirClient

BASE = "http://fhir.test/fhir"
Resource = dict[str, Any]


class FakeFhir:
    def __init__(self) -> None:
        self.store: dict[str, dict[str, Resource]] = {}
        self._ids = itertools.count(1)
        self.clock = datetime.now(UTC)
        self.requests: list[tuple[str, str]] = []
        #: called before each request; may raise (e.g. httpx.ConnectError) to fake an outage
        self.before: Callable[[httpx.Request], None] | None = None

    # --- state --------------------------------------------------------------------------

    def tick(self, seconds: float = 1.0) -> datetime:
        self.clock += timedelta(seconds=seconds)
        return self.clock

    def put(self, resource: Resource) -> Resource:
        kind = resource["resourceType"]
        rid = str(resource.get("id") or next(self._ids))
        old = self.store.get(kind, {}).get(rid)
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        stored = copy.deepcopy(resource)
        stored["id"] = rid
        meta = dict(stored.get("meta") or {})
        meta.update(
            versionId=str(version), lastUpdated=self.tick(0.001).isoformat(timespec="milliseconds")
        )
        stored["meta"] = meta
        self.store.setdefault(kind, {})[rid] = stored
        return copy.deepcopy(stored)

    def all(self, kind: str) -> list[Resource]:
        return [copy.deepcopy(r) for r in self.store.get(kind, {}).values()]

    def client(self) -> FhirClient:
        return FhirClient(BASE, transport=httpx.MockTransport(self.handle))

    # --- HTTP ---------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        self.requests.append((request.method, path))
        if self.before is not None:
            self.before(request)
        body = json.loads(request.content) if request.content else None
        parts = path.split("/") if path else []
        if request.method == "POST" and not parts:
            return _json(self._transaction(body))
        if request.method == "GET" and len(parts) == 1:
            params = parse_qsl(request.url.query.decode(), keep_blank_values=True)
            found = self.search(parts[0], params)
            if ("_summary", "count") in params:
                return _json({"resourceType": "Bundle", "type": "searchset", "total": len(found)})
            entries = [{"resource": r, "search": {"mode": "match"}} for r in found]
            return _json(
                {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": len(found),
                    "entry": entries,
                }
            )
        if request.method == "GET" and len(parts) == 2:
            found_one = self.store.get(parts[0], {}).get(parts[1])
            return _json(found_one) if found_one else _json(_outcome("not found"), 404)
        if request.method == "PUT" and len(parts) == 2:
            return _json(self.put({**body, "id": parts[1]}))
        if request.method == "POST" and len(parts) == 1:
            condition = request.headers.get("If-None-Exist")
            if condition:
                matches = self.search(parts[0], parse_qsl(condition))
                if matches:
                    return _json(matches[0])
            return _json(self.put({k: v for k, v in body.items() if k != "id"}), 201)
        return _json(_outcome(f"fake FHIR cannot {request.method} {path}"), 400)

    def _transaction(self, bundle: Resource) -> Resource:
        placeholders: dict[str, str] = {}
        written: list[tuple[Resource, Resource]] = []
        for entry in bundle.get("entry", []):
            req, res = entry["request"], copy.deepcopy(entry["resource"])
            if req["method"] == "PUT":
                rid = req["url"].split("/")[1]
                stored = self.put({**res, "id": rid})
            else:
                condition = req.get("ifNoneExist")
                matches = self.search(res["resourceType"], parse_qsl(condition or ""))
                stored = (
                    matches[0]
                    if condition and matches
                    else self.put({k: v for k, v in res.items() if k != "id"})
                )
            if entry.get("fullUrl"):
                placeholders[entry["fullUrl"]] = f"{stored['resourceType']}/{stored['id']}"
            written.append((entry, stored))
        for _, stored in written:
            text = json.dumps(stored)
            for urn, target in placeholders.items():
                text = text.replace(urn, target)
            self.store[stored["resourceType"]][stored["id"]] = json.loads(text)
        entries = [
            {"response": {"status": "201", "location": f"{s['resourceType']}/{s['id']}/_history/1"}}
            for _, s in written
        ]
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}

    # --- search -------------------------------------------------------------------------

    def search(self, kind: str, params: list[tuple[str, str]]) -> list[Resource]:
        out = []
        for r in self.store.get(kind, {}).values():
            if all(self._matches(r, name, value) for name, value in params):
                out.append(copy.deepcopy(r))
        return out

    def _matches(self, r: Resource, name: str, value: str) -> bool:
        if name.startswith("_"):
            return True
        options = value.split(",")
        if name == "identifier":
            return any(_identifier_matches(r, o) for o in options)
        if name == "status":
            return r.get("status") in options
        if name == "part-of":
            return _refers(r.get("partOf", []), options)
        if name == "derived-from":
            return _refers(r.get("derivedFrom", []), options)
        if name == "target":  # Provenance; an unresolved urn:uuid matches nothing
            return _refers(r.get("target", []), options)
        if name == "focus":
            return _refers([r.get("focus") or {}], options)
        if name == "result:Observation.derived-from":
            observations = self.store.get("Observation", {})
            refs = [x.get("reference", "") for x in r.get("result", [])]
            return any(
                _refers(observations.get(ref.split("/")[-1], {}).get("derivedFrom", []), options)
                for ref in refs
            )
        raise AssertionError(f"fake FHIR cannot search {name}={value}")


def _identifier_matches(r: Resource, option: str) -> bool:
    system, _, value = option.partition("|")
    return any(
        i.get("system") == system and (not value or i.get("value") == value)
        for i in r.get("identifier", [])
    )


def _refers(references: list[Resource], options: list[str]) -> bool:
    return any(x.get("reference") in options for x in references)


def _outcome(text: str) -> Resource:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


def _json(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)
