"""The radiologist's review transaction (fhir_service.fhir.review) against the real HAPI,
with its request validation on: agree → final, disagree → amended + the reviewer's own
Observation, Provenance (Device author, Practitioner verifier), the report final with its
interpreter once every finding is reviewed, a second review kept, a stale write refused."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from cxr_errors import FhirError
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.review import ReviewDecision, build_review_transaction, review_records
from tests.integration.conftest import HapiServer
from tests.integration.test_builders_hapi import Posted, _post

pytestmark = pytest.mark.integration

Resource = dict[str, Any]


@pytest.fixture(scope="module")
def client(hapi: HapiServer) -> Iterator[FhirClient]:
    with FhirClient(hapi.base_url, timeout=120.0) as c:
        yield c


def _all(client: FhirClient, kind: str, params: dict[str, str]) -> list[Resource]:
    return list(client.search_all(kind, params))


def _practitioner(client: FhirClient, name: str) -> str:
    pid = f"rad-{name}-{uuid.uuid4().hex[:8]}"
    client.request(
        "PUT",
        f"Practitioner/{pid}",
        json={"resourceType": "Practitioner", "id": pid, "name": [{"family": name}]},
    )
    return f"Practitioner/{pid}"


def _state(client: FhirClient, posted: Posted) -> tuple[Resource, dict[str, Resource]]:
    (report_ref,) = posted.location("DiagnosticReport")
    report = client.read_reference(report_ref)
    observations = {
        ref.split("/")[1]: client.read_reference(ref) for ref in posted.location("Observation")
    }
    return report, observations


def _reviews(client: FhirClient, observations: dict[str, Resource]) -> Any:
    refs = ",".join(f"Observation/{o}" for o in observations)
    return review_records(_all(client, "Observation", {"derived-from": refs}), observations)


def _review(
    client: FhirClient, posted: Posted, decisions: list[ReviewDecision], reviewer: str
) -> Resource:
    report, observations = _state(client, posted)
    bundle = build_review_transaction(
        report,
        observations,
        decisions,
        reviewer=reviewer,
        reviewed=_reviews(client, observations),
        review_id=uuid.uuid4().hex,
        recorded=datetime.now(UTC),
    )
    assert bundle is not None
    return client.transaction(bundle)


def test_a_whole_review_round_trips(client: FhirClient) -> None:
    posted = _post(client)
    first, second = _practitioner(client, "first"), _practitioner(client, "second")
    report, observations = _state(client, posted)
    ids = list(observations)

    _review(client, posted, [ReviewDecision(ids[0], "agree")], first)
    _review(client, posted, [ReviewDecision(ids[1], "disagree", "no effusion here")], first)
    _review(client, posted, [ReviewDecision(ids[2], "uncertain", "rotated film")], first)
    _, now = _state(client, posted)
    assert [now[i]["status"] for i in ids[:3]] == ["final", "amended", "preliminary"]
    assert now[ids[1]]["valueQuantity"] == observations[ids[1]]["valueQuantity"]
    assert "no effusion here" in now[ids[1]]["note"][-1]["text"]

    human = _all(client, "Observation", {"derived-from": f"Observation/{ids[1]}"})
    assert len(human) == 1
    assert human[0]["performer"] == [{"reference": first}]
    assert human[0]["status"] == "final"
    provenance = [
        p
        for p in _all(client, "Provenance", {"target": f"Observation/{ids[1]}"})
        if p["activity"]["coding"][0]["code"] == "UPDATE"  # not the AI's own CREATE
    ]
    assert len(provenance) == 1
    agents = {a["type"]["coding"][0]["code"]: a["who"]["reference"] for a in provenance[0]["agent"]}
    assert agents["verifier"] == first
    assert agents["author"] == observations[ids[1]]["device"]["reference"]
    assert client.read_reference(f"DiagnosticReport/{report['id']}")["status"] == "preliminary"

    # The rest in one submission: the report becomes final, interpreted by the reviewer.
    _review(client, posted, [ReviewDecision(i, "agree") for i in ids[3:]], first)
    final = client.read_reference(f"DiagnosticReport/{report['id']}")
    assert final["status"] == "final"
    assert final["resultsInterpreter"] == [{"reference": first}]
    report_provenance = _all(client, "Provenance", {"target": f"DiagnosticReport/{report['id']}"})
    assert any(a["who"]["reference"] == first for p in report_provenance for a in p["agent"]), (
        "the report's own change is attributed"
    )

    # A second reviewer disagrees with a finding the first agreed with: kept beside it.
    _review(client, posted, [ReviewDecision(ids[0], "disagree", "I see one")], second)
    _, later = _state(client, posted)
    assert later[ids[0]]["status"] == "amended"
    assert [n["text"].split(" by ")[0] for n in later[ids[0]]["note"][-2:]] == [
        "Agreed",
        "Disagreed",
    ]
    records = _reviews(client, later)[ids[0]]
    assert [(r.verdict, r.reviewer) for r in records] == [("agree", first), ("disagree", second)]
    amended = client.read_reference(f"DiagnosticReport/{report['id']}")
    assert amended["status"] == "amended"
    assert amended["resultsInterpreter"] == [{"reference": first}, {"reference": second}]


def test_a_stale_review_is_refused_whole(client: FhirClient) -> None:
    posted = _post(client)
    reviewer = _practitioner(client, "stale")
    report, observations = _state(client, posted)
    oid = next(iter(observations))
    stale = build_review_transaction(
        report,
        observations,
        [ReviewDecision(oid, "disagree")],
        reviewer=reviewer,
        reviewed={},
        review_id=uuid.uuid4().hex,
        recorded=datetime.now(UTC),
    )
    _review(client, posted, [ReviewDecision(oid, "agree")], reviewer)
    assert stale is not None
    with pytest.raises(FhirError):
        client.transaction(stale)
    # Nothing of the stale transaction was written.
    assert len(_all(client, "Observation", {"derived-from": f"Observation/{oid}"})) == 1
