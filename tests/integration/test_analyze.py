"""``$analyze`` over HTTP at the running service: the service key gets an unsaved collection
Bundle and HAPI gains nothing; no credentials get 401, a black square the gate's 422."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


def _body(data: bytes) -> dict[str, object]:
    image = {"contentType": "image/png", "data": base64.b64encode(data).decode()}
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": "image", "valueAttachment": image}],
    }


def test_analyze_reads_an_image_and_saves_nothing(stack: Stack) -> None:
    url = f"{stack.settings.service_url}/fhir/$analyze"
    key = {"Authorization": f"Bearer {stack.settings.service_api_key}"}
    rec = stack.records[2]
    png = (stack.settings.shared_dir / "data" / "nih-sample" / rec.image_index).read_bytes()

    answer = httpx.post(url, json=_body(png), headers=key, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    bundle = answer.json()
    assert bundle["type"] == "collection"
    assert bundle["meta"]["tag"][0]["code"] == "not-saved"
    report = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert report["conclusion"].startswith("NOT SAVED TO THE RECORD")
    ident = report["identifier"][0]
    stored = stack.fhir.search(
        "DiagnosticReport", {"identifier": f"{ident['system']}|{ident['value']}"}
    )
    assert not stored.get("entry")  # nothing of it reached the record

    refused = httpx.post(url, json=_body(png), timeout=60)
    assert refused.status_code == 401 and refused.json()["resourceType"] == "OperationOutcome"

    black = io.BytesIO()
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(black, format="PNG")
    gated = httpx.post(url, json=_body(black.getvalue()), headers=key, timeout=120)
    assert gated.status_code == 422
    assert "not a frontal chest radiograph" in gated.json()["issue"][0]["diagnostics"]
