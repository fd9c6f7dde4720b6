"""The HAPI FHIR server built from hapi-fhir/: boot, CRUD, validation, rest-hook, persistence.

Runs against the real server (see ``conftest.py``). The restart test is last on purpose:
it stops and starts the shared server.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests import factories
from tests.integration.conftest import HapiServer

pytestmark = pytest.mark.integration

SECRET_HEADER = "X-Cxr-Secret"
DELIVERY_TIMEOUT_S = 30.0


def _created_id(resp: httpx.Response) -> str:
    assert resp.status_code == 201, resp.text[:2000]
    body = resp.json()
    return str(body["id"])


def _error_issues(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    assert outcome["resourceType"] == "OperationOutcome"
    return [i for i in outcome["issue"] if i["severity"] in ("error", "fatal")]


@pytest.fixture(scope="module")
def rows(shared_dir: Path) -> list[factories.ManifestRow]:
    return factories.manifest_rows(shared_dir)


def test_boots_clean_and_serves_r4_capability_statement(
    hapi: HapiServer, fhir: httpx.Client
) -> None:
    # The fixture wiped the H2 directory, so this boot created the schema from scratch.
    assert hapi.boot_s > 0
    resp = fhir.get("/metadata")
    assert resp.status_code == 200
    cap = resp.json()
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in cap["rest"][0]["resource"]}
    assert {"Patient", "ImagingStudy", "Observation", "Subscription", "Binary"} <= types


def test_cors_preflight_is_answered(fhir: httpx.Client) -> None:
    resp = fhir.request(
        "OPTIONS",
        "/Patient",
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] in ("*", "http://localhost:5173")
    assert "POST" in resp.headers["access-control-allow-methods"]


def test_patient_and_imaging_study_create_read_search(
    fhir: httpx.Client, rows: list[factories.ManifestRow]
) -> None:
    row = rows[0]
    pat = factories.patient(row)
    pid = _created_id(fhir.post("/Patient", json=pat))
    study = factories.imaging_study(row, f"Patient/{pid}")
    sid = _created_id(fhir.post("/ImagingStudy", json=study))

    read = fhir.get(f"/Patient/{pid}").json()
    assert read["identifier"] == pat["identifier"]
    assert read["gender"] == pat["gender"]
    read_study = fhir.get(f"/ImagingStudy/{sid}").json()
    assert read_study["subject"]["reference"] == f"Patient/{pid}"
    assert read_study["series"][0]["instance"][0]["title"] == row.file

    ident = pat["identifier"][0]
    found = fhir.get(
        "/Patient", params={"identifier": f"{ident['system']}|{ident['value']}"}
    ).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [pid]

    by_subject = fhir.get(
        "/ImagingStudy", params={"subject": f"Patient/{pid}", "status": "available"}
    ).json()
    assert [e["resource"]["id"] for e in by_subject["entry"]] == [sid]
    chained = fhir.get(
        "/ImagingStudy",
        params={"patient.identifier": f"{ident['system']}|{ident['value']}", "modality": "DX"},
    ).json()
    assert [e["resource"]["id"] for e in chained["entry"]] == [sid]


def test_invalid_observation_is_refused_with_operation_outcome(fhir: httpx.Client) -> None:
    resp = fhir.post("/Observation", json=factories.invalid_observation())
    assert 400 <= resp.status_code < 500, resp.text[:2000]
    errors = _error_issues(resp.json())
    assert any("Observation.status" in json.dumps(i) for i in errors), errors


def test_invalid_entry_in_transaction_is_refused_and_nothing_stored(fhir: httpx.Client) -> None:
    ident = factories.unique_suffix()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:" + factories.unique_suffix(),
                "resource": factories.patient(identifier=ident),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": factories.invalid_observation(),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    resp = fhir.post("", json=bundle)
    assert 400 <= resp.status_code < 500, resp.text[:2000]
    assert _error_issues(resp.json())
    left = fhir.get(
        "/Patient", params={"identifier": f"{factories.NIH_PATIENT_SYSTEM}|{ident}"}
    ).json()
    assert left.get("total", 0) == 0 and not left.get("entry")


def test_unknown_code_systems_are_warnings_not_errors(fhir: httpx.Client) -> None:
    obs = {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "36554-4"},
                {"system": "http://snomed.info/sct", "code": "36118008"},
                {"system": "http://radlex.org", "code": "RID5352"},
            ]
        },
        "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "39607008"}]},
        "valueQuantity": {"value": 0.42, "system": "http://unitsofmeasure.org", "code": "1"},
    }
    _created_id(fhir.post("/Observation", json=obs))


def test_binary_round_trip(fhir: httpx.Client, rows: list[factories.ManifestRow]) -> None:
    png = rows[0].path.read_bytes()
    assert 100_000 < len(png) < 1_000_000
    bid = _created_id(
        fhir.post("/Binary", json=factories.binary("image/png", base64.b64encode(png).decode()))
    )
    raw = fhir.get(f"/Binary/{bid}", headers={"Accept": "image/png"})
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("image/png")
    assert raw.content == png
    as_json = fhir.get(f"/Binary/{bid}").json()
    assert base64.b64decode(as_json["data"]) == png

    # A body of a few MB (a study's worth of images in one request) must be accepted too.
    big = os.urandom(3 * 1024 * 1024)
    big_id = _created_id(
        fhir.post(
            "/Binary",
            json=factories.binary("application/octet-stream", base64.b64encode(big).decode()),
        )
    )
    assert (
        fhir.get(f"/Binary/{big_id}", headers={"Accept": "application/octet-stream"}).content == big
    )


# --- rest-hook subscription ---------------------------------------------------------


@dataclass
class Delivery:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HookReceiver:
    """A tiny HTTP server standing in for ``cxr serve``'s rest-hook endpoint."""

    server: ThreadingHTTPServer
    deliveries: list[Delivery] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def wait_for(self, path: str, timeout_s: float) -> Delivery | None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for d in self.deliveries:
                    if urlsplit(d.path).path == path:
                        return d
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)

    def paths(self) -> list[str]:
        with self.cond:
            return [urlsplit(d.path).path for d in self.deliveries]


@pytest.fixture
def receiver() -> Iterator[HookReceiver]:
    holder: dict[str, HookReceiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            rec = holder["r"]
            with rec.cond:
                rec.deliveries.append(
                    Delivery(self.command, self.path, {k: v for k, v in self.headers.items()}, body)
                )
                rec.cond.notify_all()
            # Acknowledge at once, as the real receiver must (HAPI's client times out at 10 s).
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = do_DELETE = _record

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = rec = HookReceiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _wait_active(fhir: httpx.Client, sub_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        sub: dict[str, Any] = fhir.get(f"/Subscription/{sub_id}").json()
        if sub["status"] in ("active", "error") or time.monotonic() > deadline:
            return sub
        time.sleep(0.25)


def test_rest_hook_delivers_matching_imaging_study_only(
    hapi: HapiServer,
    fhir: httpx.Client,
    receiver: HookReceiver,
    rows: list[factories.ManifestRow],
) -> None:
    secret = "s3cret-" + factories.unique_suffix()
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "cxr-fhir integration test",
        "criteria": "ImagingStudy?status=available",
        "channel": {
            "type": "rest-hook",
            "endpoint": receiver.endpoint,
            "payload": "application/fhir+json",
            "header": [f"{SECRET_HEADER}: {secret}"],
        },
    }
    sub_id = _created_id(fhir.post("/Subscription", json=subscription))
    try:
        sub = _wait_active(fhir, sub_id, timeout_s=30)
        assert sub["status"] == "active", sub

        row = rows[1]
        pid = _created_id(fhir.post("/Patient", json=factories.patient(row)))
        # The non-matching study goes first: once the matching one has been delivered, the
        # earlier change has certainly been through the matcher too.
        skipped_id = _created_id(
            fhir.post(
                "/ImagingStudy",
                json=factories.imaging_study(row, f"Patient/{pid}", status="registered"),
            )
        )
        t0 = time.monotonic()
        sid = _created_id(
            fhir.post("/ImagingStudy", json=factories.imaging_study(row, f"Patient/{pid}"))
        )
        delivery = receiver.wait_for(f"/hook/ImagingStudy/{sid}", DELIVERY_TIMEOUT_S)
        assert delivery is not None, (
            f"no delivery within {DELIVERY_TIMEOUT_S} s: {receiver.paths()}"
        )
        latency = time.monotonic() - t0
        assert delivery.method == "PUT"
        headers = {k.lower(): v for k, v in delivery.headers.items()}
        assert headers.get(SECRET_HEADER.lower()) == secret
        assert headers.get("content-type", "").startswith("application/fhir+json")
        body = json.loads(delivery.body)
        assert body["resourceType"] == "ImagingStudy"
        assert body["id"] == sid
        assert body["status"] == "available"

        # A few more matching intervals for anything late.
        time.sleep(max(2.0, 4 * hapi.settings.hapi_subscription_interval_ms / 1000))
        assert f"/hook/ImagingStudy/{skipped_id}" not in receiver.paths()
        print(f"rest-hook delivery latency {latency:.2f} s")
    finally:
        # Otherwise HAPI keeps retrying deliveries to the closed receiver for a minute.
        fhir.delete(f"/Subscription/{sub_id}")


# --- persistence: keep this test last, it restarts the shared server --------------------


def test_restart_on_same_data_dir_keeps_resources(
    hapi: HapiServer, rows: list[factories.ManifestRow]
) -> None:
    row = rows[2]
    with hapi.client() as fhir:
        pid = _created_id(fhir.post("/Patient", json=factories.patient(row)))
        sid = _created_id(
            fhir.post("/ImagingStudy", json=factories.imaging_study(row, f"Patient/{pid}"))
        )

    boot_s = hapi.restart()
    assert boot_s > 0

    with hapi.client() as fhir:
        assert fhir.get(f"/Patient/{pid}").status_code == 200
        study = fhir.get(f"/ImagingStudy/{sid}").json()
        assert study["subject"]["reference"] == f"Patient/{pid}"
        found = fhir.get("/ImagingStudy", params={"subject": f"Patient/{pid}"}).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [sid]
