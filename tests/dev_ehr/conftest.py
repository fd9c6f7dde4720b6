"""The dev EHR in-process (Starlette's TestClient), in front of a fake HAPI
(``httpx.MockTransport`` over a dict of resources), with a clock the tests move."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fhir_service.dev_ehr import build_ehr, create_app
from fhir_service.dev_ehr.app import SIGNING_KEY_FILE
from fhir_service.settings import Settings
from tests.dev_ehr.smart_client import SmartClient

HAPI = "http://hapi.test/fhir"
DEV_EHR = "http://dev-ehr.test"
APP = "http://app.test"


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _patient(pid: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": family, "given": ["Ann"]}]}


def _subject(rtype: str, rid: str, pid: str, **extra: Any) -> dict[str, Any]:
    key = "for" if rtype == "Task" else "subject"
    return {"resourceType": rtype, "id": rid, key: {"reference": f"Patient/{pid}"}, **extra}


@dataclass
class FakeHapi:
    """Just enough of a FHIR server: reads, patient searches, $similar, metadata."""

    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    down: bool = False

    def add(self, resource: dict[str, Any]) -> None:
        self.resources[(resource["resourceType"], resource["id"])] = resource

    def bundle(self, resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "link": [{"relation": "self", "url": f"{HAPI}/whatever"}],
            "entry": [
                {"fullUrl": f"{HAPI}/{r['resourceType']}/{r['id']}", "resource": r}
                for r in resources
            ],
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path.removeprefix("/fhir").strip("/")
        parts = path.split("/") if path else []
        q = request.url.params
        if request.method not in ("GET",) and not path.endswith("$similar"):
            return httpx.Response(201, json={"resourceType": "OperationOutcome", "issue": []})
        if parts == ["metadata"]:
            return httpx.Response(
                200, json={"resourceType": "CapabilityStatement", "rest": [{"mode": "server"}]}
            )
        if parts and parts[-1] == "$similar":
            studies = [r for (t, _), r in self.resources.items() if t == "ImagingStudy"]
            return httpx.Response(200, json=self.bundle(studies))
        if len(parts) == 1:
            rtype = parts[0]
            found = [r for (t, _), r in self.resources.items() if t == rtype]
            if "_id" in q:
                found = [r for r in found if r["id"] == q["_id"]]
            for name in ("patient", "subject"):
                if name in q:
                    pid = q[name].removeprefix("Patient/")
                    found = [r for r in found if _ref_pid(r) == pid]
            return httpx.Response(200, json=self.bundle(found))
        if len(parts) in (2, 4):
            res = self.resources.get((parts[0], parts[1]))
            if res is None:
                return httpx.Response(
                    404, json={"resourceType": "OperationOutcome", "issue": [{"code": "not-found"}]}
                )
            return httpx.Response(200, content=json.dumps(res).encode())
        return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": []})


def _ref_pid(resource: dict[str, Any]) -> str | None:
    ref = (resource.get("subject") or resource.get("for") or {}).get("reference", "")
    m = re.fullmatch(r"Patient/(.+)", ref)
    return m.group(1) if m else None


@pytest.fixture
def fake_hapi() -> FakeHapi:
    hapi = FakeHapi()
    for pid, family in (("p1", "Alpha"), ("p2", "Beta")):
        hapi.add(_patient(pid, family))
        hapi.add(_subject("ImagingStudy", f"study-{pid}", pid, status="available"))
        hapi.add(_subject("DiagnosticReport", f"report-{pid}", pid, status="preliminary"))
        hapi.add(_subject("Observation", f"obs-{pid}", pid, status="preliminary"))
        hapi.add(_subject("Media", f"media-{pid}", pid, status="completed"))
        hapi.add(_subject("Task", f"task-{pid}", pid, status="failed"))
    hapi.add({"resourceType": "Device", "id": "model"})
    return hapi


@pytest.fixture(scope="session")
def signing_key_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    # RSA key generation costs ~0.5 s: one key for the session (test_keys covers generation).
    from fhir_service.dev_ehr.tokens import load_or_create_key

    path = tmp_path_factory.mktemp("dev-ehr-key") / SIGNING_KEY_FILE
    load_or_create_key(path)
    return path.read_bytes()


@pytest.fixture
def ehr_settings(test_settings: Settings, tmp_path: Path, signing_key_pem: bytes) -> Settings:
    key_path = tmp_path / "dev-ehr" / SIGNING_KEY_FILE
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(signing_key_pem)
    return test_settings.model_copy(
        update={
            "data_dir": tmp_path,
            "hapi_base_url": HAPI,
            "dev_ehr_public_url": DEV_EHR,
            "service_public_url": APP,
        }
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dev_ehr(ehr_settings: Settings, fake_hapi: FakeHapi, clock: FakeClock) -> Iterator[TestClient]:
    ehr = build_ehr(ehr_settings, upstream_transport=httpx.MockTransport(fake_hapi), clock=clock)
    with TestClient(create_app(ehr_settings, ehr=ehr), base_url=DEV_EHR) as client:
        client.follow_redirects = False
        yield client


@pytest.fixture
def smart(dev_ehr: TestClient) -> SmartClient:
    return SmartClient(dev_ehr, iss=f"{DEV_EHR}/fhir", redirect_uri=f"{APP}/app/callback")
