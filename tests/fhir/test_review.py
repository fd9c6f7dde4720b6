"""The radiologist's review transaction (fhir_service.fhir.review): pure builders, checked
against FHIR_PROFILE.md "A radiologist's review" and validated with the R4B models."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from fhir_service.fhir.inbound import validation_problems
from fhir_service.fhir.review import (
    ReviewDecision,
    ReviewError,
    ReviewRecord,
    build_review_transaction,
    review_records,
)
from fhir_service.fhir.terminology import TERMINOLOGY
from tests.factories import result_bundle

Resource = dict[str, Any]
REVIEWER = "Practitioner/rad-1"
OTHER = "Practitioner/rad-2"
WHEN = datetime(2026, 12, 2, 16, 30, tzinfo=UTC)
AIAST = TERMINOLOGY.concept("ai_asserted")["code"]


def stored_result() -> tuple[Resource, dict[str, Resource]]:
    """A result transaction as HAPI would store it: ids, versions, references resolved."""
    bundle = result_bundle()
    ids: dict[str, str] = {}
    counters: dict[str, int] = {}
    for entry in bundle["entry"]:
        kind = entry["resource"]["resourceType"]
        counters[kind] = counters.get(kind, 0) + 1
        ids[entry["fullUrl"]] = f"{kind}/{kind.lower()}-{counters[kind]}"

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (ids.get(v, v) if k == "reference" else resolve(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(x) for x in node]
        return node

    stored = []
    for entry in bundle["entry"]:
        res = resolve(entry["resource"])
        res["id"] = ids[entry["fullUrl"]].split("/")[1]
        res["meta"] = {**res.get("meta", {}), "versionId": "1"}
        stored.append(res)
    report = next(r for r in stored if r["resourceType"] == "DiagnosticReport")
    observations = {r["id"]: r for r in stored if r["resourceType"] == "Observation"}
    return report, observations


def by_kind(bundle: Resource, kind: str, method: str | None = None) -> list[Resource]:
    return [
        e
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == kind
        and (method is None or e["request"]["method"] == method)
    ]


def interpretation(obs: Resource) -> str:
    return str(obs["interpretation"][0]["coding"][0]["code"])


def build(
    decisions: list[ReviewDecision],
    *,
    reviewed: dict[str, list[ReviewRecord]] | None = None,
    reviewer: str = REVIEWER,
    review_id: str = "review-0001",
    stored: tuple[Resource, dict[str, Resource]] | None = None,
) -> Resource:
    report, observations = stored or stored_result()
    bundle = build_review_transaction(
        report,
        observations,
        decisions,
        reviewer=reviewer,
        reviewed=reviewed or {},
        review_id=review_id,
        recorded=WHEN,
    )
    assert bundle is not None
    return bundle


def test_agree_makes_the_observation_final_with_provenance() -> None:
    report, observations = stored_result()
    oid = next(iter(observations))
    bundle = build([ReviewDecision(oid, "agree")], stored=(report, observations))
    assert validation_problems(bundle) == []
    for entry in bundle["entry"]:
        assert validation_problems(entry["resource"]) == [], entry["resource"]["resourceType"]

    (put,) = by_kind(bundle, "Observation", "PUT")
    assert put["request"] == {"method": "PUT", "url": f"Observation/{oid}", "ifMatch": 'W/"1"'}
    updated = put["resource"]
    ai = observations[oid]
    assert updated["status"] == "final"
    # The AI value, interpretation and AIAST label are kept; a note names the reviewer.
    assert updated["valueQuantity"] == ai["valueQuantity"]
    assert updated["interpretation"] == ai["interpretation"]
    assert updated["meta"]["security"][0]["code"] == AIAST
    assert "versionId" not in updated["meta"]
    assert updated["note"][-1]["authorReference"] == {"reference": REVIEWER}
    assert updated["note"][-1]["text"].startswith(f"Agreed by {REVIEWER}")

    (mine,) = by_kind(bundle, "Observation", "POST")
    human = mine["resource"]
    assert human["status"] == "final"
    assert human["performer"] == [{"reference": REVIEWER}]
    assert human["derivedFrom"] == [{"reference": f"Observation/{oid}"}]
    assert human["code"] == ai["code"]
    assert interpretation(human) == interpretation(ai)
    assert "meta" not in human  # no AIAST: a human asserted this
    assert mine["request"]["ifNoneExist"].startswith("identifier=")

    provenances = by_kind(bundle, "Provenance")
    assert len(provenances) == 1  # one finding of 14 reviewed: the report stays open
    prov = provenances[0]["resource"]
    assert [a["type"]["coding"][0]["code"] for a in prov["agent"]] == ["author", "verifier"]
    assert prov["agent"][0]["who"] == ai["device"]
    assert prov["agent"][1]["who"] == {"reference": REVIEWER}
    assert prov["activity"]["coding"][0]["code"] == "UPDATE"
    assert {t["reference"] for t in prov["target"]} == {f"Observation/{oid}", mine["fullUrl"]}
    assert prov["entity"] == [
        {"role": "source", "what": {"reference": f"Observation/{oid}/_history/1"}}
    ]
    assert by_kind(bundle, "DiagnosticReport") == []


def test_disagree_amends_and_records_the_human_finding() -> None:
    report, observations = stored_result()
    oid, ai = next(iter(observations.items()))
    bundle = build(
        [ReviewDecision(oid, "disagree", "  clear lungs, no effusion ")],
        stored=(report, observations),
    )
    assert validation_problems(bundle) == []
    updated = by_kind(bundle, "Observation", "PUT")[0]["resource"]
    assert updated["status"] == "amended"
    assert updated["valueQuantity"] == ai["valueQuantity"]
    assert updated["note"][-1]["text"] == (
        f"Disagreed by {REVIEWER} (radiologist review): clear lungs, no effusion"
    )
    human = by_kind(bundle, "Observation", "POST")[0]["resource"]
    flipped = {"POS": "NEG", "NEG": "POS"}[interpretation(ai)]
    assert interpretation(human) == flipped
    assert human["note"][0]["text"] == "clear lungs, no effusion"


def test_uncertain_keeps_the_status_and_says_indeterminate() -> None:
    _report, observations = stored_result()
    oid = next(iter(observations))
    bundle = build([ReviewDecision(oid, "uncertain", "poor inspiration")])
    updated = by_kind(bundle, "Observation", "PUT")[0]["resource"]
    assert updated["status"] == "preliminary"
    human = by_kind(bundle, "Observation", "POST")[0]["resource"]
    assert interpretation(human) == "IND"


def test_the_last_finding_makes_the_report_final_with_its_interpreter() -> None:
    report, observations = stored_result()
    ids = list(observations)
    records = {
        oid: [ReviewRecord(oid, "agree", OTHER, None, None, "x", f"r0.{oid}")] for oid in ids[1:]
    }
    bundle = build(
        [ReviewDecision(ids[0], "disagree")], reviewed=records, stored=(report, observations)
    )
    assert validation_problems(bundle) == []
    (put,) = by_kind(bundle, "DiagnosticReport")
    assert put["request"]["ifMatch"] == 'W/"1"'
    assert put["resource"]["status"] == "final"
    assert put["resource"]["resultsInterpreter"] == [{"reference": REVIEWER}]
    assert put["resource"]["result"] == report["result"]
    report_prov = by_kind(bundle, "Provenance")[-1]["resource"]
    assert report_prov["target"] == [{"reference": f"DiagnosticReport/{report['id']}"}]
    assert report_prov["agent"][1]["who"] == {"reference": REVIEWER}


def test_all_findings_in_one_submission() -> None:
    report, observations = stored_result()
    bundle = build(
        [ReviewDecision(o, "agree") for o in observations], stored=(report, observations)
    )
    assert validation_problems(bundle) == []
    assert len(by_kind(bundle, "Observation", "PUT")) == 14
    assert len(by_kind(bundle, "Observation", "POST")) == 14
    assert by_kind(bundle, "DiagnosticReport")[0]["resource"]["status"] == "final"


def test_a_second_reviewer_adds_never_replaces() -> None:
    report, observations = stored_result()
    report = {**report, "status": "final", "resultsInterpreter": [{"reference": REVIEWER}]}
    oid = next(iter(observations))
    ai = copy.deepcopy(observations[oid])
    ai["status"] = "final"
    ai["note"] = [{"text": f"Agreed by {REVIEWER} (radiologist review)"}]
    observations[oid] = ai
    records = {
        o: [ReviewRecord(o, "agree", REVIEWER, None, None, "x", f"r0.{o}")] for o in observations
    }
    bundle = build(
        [ReviewDecision(oid, "disagree", "I see a small effusion")],
        reviewer=OTHER,
        reviewed=records,
        review_id="review-0002",
        stored=(report, observations),
    )
    updated = by_kind(bundle, "Observation", "PUT")[0]["resource"]
    assert updated["status"] == "amended"
    assert [n["text"].split(" by ")[0] for n in updated["note"]] == ["Agreed", "Disagreed"]
    (report_put,) = by_kind(bundle, "DiagnosticReport")
    assert report_put["resource"]["status"] == "amended"
    assert report_put["resource"]["resultsInterpreter"] == [
        {"reference": REVIEWER},
        {"reference": OTHER},
    ]
    # A later agreement does not undo a disagreement.
    ai2 = {**updated, "id": oid, "meta": {"versionId": "3"}}
    again = build_review_transaction(
        report_put["resource"] | {"id": report["id"], "meta": {"versionId": "2"}},
        {**observations, oid: ai2},
        [ReviewDecision(oid, "agree")],
        reviewer=REVIEWER,
        reviewed=records,
        review_id="review-0003",
        recorded=WHEN,
    )
    assert again is not None
    assert by_kind(again, "Observation", "PUT")[0]["resource"]["status"] == "amended"


def test_a_resubmitted_review_is_recognised() -> None:
    report, observations = stored_result()
    oid = next(iter(observations))
    bundle = build([ReviewDecision(oid, "disagree", "no")], stored=(report, observations))
    stored_review = {**by_kind(bundle, "Observation", "POST")[0]["resource"], "id": "h1"}
    records = review_records([stored_review, *observations.values()], observations)
    assert list(records) == [oid]
    (rec,) = records[oid]
    assert (rec.verdict, rec.reviewer, rec.comment) == ("disagree", REVIEWER, "no")
    assert rec.review_key == f"review-0001.{oid}"
    again = build_review_transaction(
        report,
        observations,
        [ReviewDecision(oid, "disagree", "no")],
        reviewer=REVIEWER,
        reviewed=records,
        review_id="review-0001",
        recorded=WHEN,
    )
    assert again is None


def test_review_records_read_every_verdict() -> None:
    report, observations = stored_result()
    ids = list(observations)
    bundle = build(
        [
            ReviewDecision(ids[0], "agree"),
            ReviewDecision(ids[1], "disagree"),
            ReviewDecision(ids[2], "uncertain"),
        ],
        stored=(report, observations),
    )
    humans = [e["resource"] for e in by_kind(bundle, "Observation", "POST")]
    records = review_records(humans, observations)
    assert {k: [r.verdict for r in v] for k, v in records.items()} == {
        ids[0]: ["agree"],
        ids[1]: ["disagree"],
        ids[2]: ["uncertain"],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"observation_id": "nope"}, "not a finding of this report"),
        ({"verdict": "maybe"}, "verdict must be one of"),
        ({"comment": "x" * 2001}, "at most 2000"),
    ],
)
def test_bad_decisions_are_refused(change: dict[str, Any], message: str) -> None:
    report, observations = stored_result()
    oid = next(iter(observations))
    decision = ReviewDecision(**{"observation_id": oid, "verdict": "agree", **change})
    with pytest.raises(ReviewError, match=message):
        build([decision], stored=(report, observations))


@pytest.mark.parametrize("reviewer", ["Patient/1", "https://ehr/Practitioner/1", ""])
def test_the_reviewer_must_be_a_practitioner(reviewer: str) -> None:
    _report, observations = stored_result()
    with pytest.raises(ReviewError, match="Practitioner"):
        build([ReviewDecision(next(iter(observations)), "agree")], reviewer=reviewer)


def test_one_finding_decided_twice_is_refused() -> None:
    _report, observations = stored_result()
    oid = next(iter(observations))
    with pytest.raises(ReviewError, match="decided twice"):
        build([ReviewDecision(oid, "agree"), ReviewDecision(oid, "disagree")])


def test_an_upload_transaction_is_valid_r4() -> None:
    from fhir_service.fhir.uploads import build_upload_transaction

    bundle = build_upload_transaction(
        "p1", b"\x89PNG\r\n", "image/png", uploaded=WHEN, title="chest.png"
    )
    assert validation_problems(bundle) == []
    study, media = (e["resource"] for e in bundle["entry"])
    assert study["subject"] == media["subject"] == {"reference": "Patient/p1"}
    assert media["partOf"] == [{"reference": bundle["entry"][0]["fullUrl"]}]
    assert study["status"] == "available"
