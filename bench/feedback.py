"""A radiologist's review written to FHIR: our one transaction against plain sequential REST.

Measured in one run, against one HAPI (H2, request validation on, as the tests run it), on
synthetic results (the review builders' input; no model needed):

* **ours**: :func:`fhir_service.fhir.review.build_review_transaction` for one finding (the AI
  Observation's PUT with ``If-Match``, the reviewer's Observation, the Provenance) posted as
  one transaction — what the app sends per click;
* **peer**: the same three writes as three plain REST requests one after another (PUT the
  Observation with ``If-Match``, POST the reviewer's Observation, POST the Provenance naming
  its real id): no atomicity, a failure halfway leaves a half-recorded review.

Also the last click of a study (14th finding: the DiagnosticReport's PUT and its Provenance
join the transaction). p50 / p95 over ``--repeat`` reviews each. Prints, never asserts.
Own data dir and port (``.cxr-data/bench-feedback``, HAPI 19580), wiped at start.

    .venv/bin/python bench/feedback.py               # 30 reviews each
    .venv/bin/python bench/feedback.py --repeat 10   # a quicker look

The app's upload → report time needs the whole stack and a browser: the Chromium test
``tests/integration/test_app_review_browser.py::test_upload_and_read_in_chromium`` writes it to
``test-artifacts/app/review-timings.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import load, stack_settings

REVIEWER = "Practitioner/bench-radiologist"


def _post_result(client: Any, i: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    from fhir_service.fhir.results import build_result_transaction
    from tests.factories import RECORDED, make_analysis, make_heatmaps

    patient = client.create({"resourceType": "Patient", "gender": "female"})
    study = client.create(
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": {"reference": f"Patient/{patient['id']}"},
        }
    )
    analysis = make_analysis()
    sha = hashlib.sha256(f"bench {i} {uuid.uuid4()}".encode()).hexdigest()
    response = client.transaction(
        build_result_transaction(
            study, analysis, make_heatmaps(analysis), image_sha256=sha, recorded=RECORDED
        )
    )
    locs = [e["response"]["location"].split("/_history")[0] for e in response["entry"]]
    report = client.read_reference(next(x for x in locs if "DiagnosticReport/" in x))
    observations = {}
    for r in report["result"]:
        obs = client.read_reference(r["reference"])
        observations[obs["id"]] = obs
    return report, observations


def _ours(client: Any, report: dict[str, Any], obs: dict[str, Any], oid: str, done: Any) -> float:
    from fhir_service.fhir.review import ReviewDecision, build_review_transaction

    t0 = time.perf_counter()
    bundle = build_review_transaction(
        report,
        obs,
        [ReviewDecision(oid, "disagree", "bench")],
        reviewer=REVIEWER,
        reviewed=done,
        review_id=uuid.uuid4().hex,
        recorded=datetime.now(UTC),
    )
    assert bundle is not None
    client.transaction(bundle)
    return time.perf_counter() - t0


def _peer(client: Any, report: dict[str, Any], obs: dict[str, Any], oid: str, _: Any) -> float:
    from fhir_service.fhir.review import ReviewDecision, build_review_transaction

    bundle = build_review_transaction(
        report,
        obs,
        [ReviewDecision(oid, "disagree", "bench")],
        reviewer=REVIEWER,
        reviewed={},
        review_id=uuid.uuid4().hex,
        recorded=datetime.now(UTC),
    )
    assert bundle is not None
    put, mine, prov = (e for e in bundle["entry"])
    t0 = time.perf_counter()
    client.request(
        "PUT",
        put["request"]["url"],
        json={**put["resource"], "id": oid},
        headers={"If-Match": put["request"]["ifMatch"]},
    )
    created = client.create(mine["resource"])
    provenance = prov["resource"]
    provenance["target"] = [
        {"reference": f"Observation/{oid}"},
        {"reference": f"Observation/{created['id']}"},
    ]
    client.create(provenance)
    return time.perf_counter() - t0


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--data-dir", type=Path, default=Path(".cxr-data/bench-feedback"))
    parser.add_argument("--hapi-port", type=int, default=19580)
    args = parser.parse_args()

    from fhir_service.fhir.client import FhirClient
    from fhir_service.fhir.review import ReviewRecord
    from fhir_service.ops import hapi_server

    shutil.rmtree(args.data_dir, ignore_errors=True)
    settings = stack_settings(
        args.data_dir, hapi_port=args.hapi_port, pg_port=19780, service_port=19501
    )
    print(f"load at start: {load()}")
    hapi_server.stop(settings)
    hapi_server.start(settings)
    try:
        with FhirClient(settings.fhir_base_url, timeout=120.0) as client:
            client.request(
                "PUT",
                REVIEWER,
                json={"resourceType": "Practitioner", "id": REVIEWER.split("/")[1]},
            )
            results: dict[str, list[float]] = {"ours": [], "peer": [], "ours, last finding": []}
            for i in range(args.repeat):
                for name, write in (("ours", _ours), ("peer", _peer)):
                    report, obs = _post_result(client, i)
                    results[name].append(write(client, report, obs, next(iter(obs)), {}))
                # The 14th click: the report becomes final in the same transaction.
                report, obs = _post_result(client, i)
                ids = list(obs)
                done = {
                    o: [ReviewRecord(o, "agree", REVIEWER, None, None, None, "x")] for o in ids[1:]
                }
                results["ours, last finding"].append(_ours(client, report, obs, ids[0], done))
    finally:
        hapi_server.stop(settings)
    print(f"review of one finding, {args.repeat} each (ms):")
    for name, values in results.items():
        print(f"  {name:20s} p50 {_p(values, 0.5):7.1f}  p95 {_p(values, 0.95):7.1f}")
    ratio = statistics.median(results["peer"]) / statistics.median(results["ours"])
    print(f"  peer / ours (p50): {ratio:.2f}×  (ours is also atomic: all or nothing)")
    print(f"load at end: {load()}")


if __name__ == "__main__":
    main()
