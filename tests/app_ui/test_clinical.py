"""The SMART app's pure rules: worklist urgency, study status, findings and Media selection.

The FHIR resources are the ones the worker writes (``build_result_transaction``,
``build_failed_task``, ``supersede``), "posted" to a dict standing in for the FHIR server:
ids assigned, ``urn:uuid`` references resolved, superseded resources replaced by their PUT.
"""

from __future__ import annotations

import base64
import copy
import itertools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_service.app_ui import clinical
from fhir_service.fhir.results import UNTRAINED_NOTE, build_result_transaction
from fhir_service.fhir.tasks import build_completed_task, build_failed_task
from fhir_service.fhir.terminology import TERMINOLOGY
from models.types import ImageAnalysis
from tests.factories import RECORDED, make_analysis, make_heatmaps, make_png, make_study

Resource = dict[str, Any]
NIH = TERMINOLOGY.code_system_url("nih_label")
#: What the worker withdraws (supersede.supersede) when a study's image changes.
WITHDRAWN_WITH_A_REPORT = ("DiagnosticReport", "Observation", "Media")


class FakeFhir:
    """What a FHIR server holds after the worker's transactions (no HTTP, no validation)."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], Resource] = {}
        self._ids = itertools.count(1)
        self._stamp = datetime(2025, 1, 2, 8, 0, tzinfo=UTC)

    def _last_updated(self) -> str:
        self._stamp += timedelta(seconds=1)
        return self._stamp.isoformat(timespec="milliseconds")

    def put(self, resource: Mapping[str, Any]) -> Resource:
        res = copy.deepcopy(dict(resource))
        rtype = str(res["resourceType"])
        if "id" not in res:
            res["id"] = f"{rtype.lower()}-{next(self._ids)}"
        old = self.store.get((rtype, str(res["id"])))
        version = int((old or {}).get("meta", {}).get("versionId", "0")) + 1
        res.setdefault("meta", {}).update(versionId=str(version), lastUpdated=self._last_updated())
        self.store[(rtype, str(res["id"]))] = res
        return res

    def transaction(self, bundle: Mapping[str, Any]) -> list[Resource]:
        urns: dict[str, str] = {}
        pending: list[Resource] = []
        for entry in bundle["entry"]:
            res = copy.deepcopy(entry["resource"])
            if entry["request"]["method"] == "POST":
                res["id"] = f"{str(res['resourceType']).lower()}-{next(self._ids)}"
            urns[entry["fullUrl"]] = f"{res['resourceType']}/{res['id']}"
            pending.append(res)

        def resolve(node: Any) -> Any:
            if isinstance(node, dict):
                return {
                    k: urns.get(v, v) if k == "reference" and isinstance(v, str) else resolve(v)
                    for k, v in node.items()
                }
            if isinstance(node, list):
                return [resolve(x) for x in node]
            return node

        return [self.put(resolve(res)) for res in pending]

    def all(self, rtype: str) -> list[Resource]:
        return [r for (t, _), r in self.store.items() if t == rtype]

    def observations(self) -> dict[str, Resource]:
        return {str(r["id"]): r for r in self.all("Observation")}

    def analyse(
        self,
        study: Mapping[str, Any],
        probabilities: Mapping[str, float] | None = None,
        *,
        untrained: bool = False,
        recorded: datetime = RECORDED,
        supersedes: list[Resource] | None = None,
        analysis: ImageAnalysis | None = None,
    ) -> list[Resource]:
        analysis = analysis or make_analysis(probabilities, untrained=untrained)
        bundle = build_result_transaction(
            study,
            analysis,
            make_heatmaps(analysis),
            # Each analysis is of new pixels (a re-run of the same pixels would match the old).
            image_sha256=f"{next(self._ids):064x}",
            recorded=recorded,
            supersedes=supersedes or [],
        )
        return self.transaction(bundle)

    def worklist(self, studies: list[Resource]) -> list[dict[str, Any]]:
        return clinical.worklist(
            studies, self.all("DiagnosticReport"), self.observations(), self.all("Task")
        )


def posted_study(fhir: FakeFhir, study_id: str, **extra: Any) -> Resource:
    study = make_study(study_id)
    study.pop("meta")
    study.update(extra)
    return fhir.put(study)


def input_media(study_id: str, *, mid: str, updated: str, status: str = "completed") -> Resource:
    """The study's pixels as the EHR stores them (profile: Media.partOf → ImagingStudy)."""
    return {
        "resourceType": "Media",
        "id": mid,
        "meta": {"versionId": "1", "lastUpdated": updated},
        "status": status,
        "partOf": [{"reference": f"ImagingStudy/{study_id}"}],
        "subject": {"reference": "Patient/p1"},
        "content": {"contentType": "image/png", "data": base64.b64encode(make_png()).decode()},
    }


def ids(rows: list[dict[str, Any]]) -> list[Any]:
    return [r["id"] for r in rows]


# --- references and bundles -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "rtype", "expected"),
    [
        ({"reference": "ImagingStudy/cxr-1"}, "ImagingStudy", "cxr-1"),
        ({"reference": "ImagingStudy/cxr-1/_history/3"}, "ImagingStudy", "cxr-1"),
        ({"reference": "http://ehr.test/fhir/ImagingStudy/cxr-1"}, "ImagingStudy", "cxr-1"),
        ({"reference": "Observation/o-7"}, "ImagingStudy", None),
        ({"reference": "ImagingStudy/"}, "ImagingStudy", None),
        ({"reference": "ImagingStudy"}, "ImagingStudy", None),
        ({"reference": "urn:uuid:0b7e8a8c-4b2e-4f0e-9a8e-111111111111"}, "ImagingStudy", None),
        ({"display": "a study"}, "ImagingStudy", None),
        ({}, "ImagingStudy", None),
        (None, "ImagingStudy", None),
    ],
)
def test_ref_id(reference: dict[str, str] | None, rtype: str, expected: str | None) -> None:
    assert clinical.ref_id(reference, rtype) == expected


def test_entries_skips_entries_without_a_resource() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": "x", "resource": {"resourceType": "Patient", "id": "p1"}},
            {"fullUrl": "y"},
            {"resource": "not a resource"},
            {"resource": {"resourceType": "Task", "id": "t1"}},
        ],
    }
    assert [r["id"] for r in clinical.entries(bundle)] == ["p1", "t1"]
    assert clinical.entries({"resourceType": "Bundle", "type": "searchset", "total": 0}) == []


# --- one finding --------------------------------------------------------------------------------


def test_finding_of_reads_what_the_worker_writes() -> None:
    fhir = FakeFhir()
    fhir.analyse(make_study())
    by_label = {clinical.finding_label(o): o for o in fhir.all("Observation")}
    assert len(by_label) == 14

    ptx = clinical.finding_of(by_label["Pneumothorax"])
    assert ptx == {
        "finding": "Pneumothorax",
        "text": TERMINOLOGY.findings["Pneumothorax"].text,
        "score": 0.9,
        "score_kind": "probability (calibrated)",
        "band_low": pytest.approx(0.82),
        "band_high": pytest.approx(0.96),
        "band_kind": "95 % band",
        "threshold": 0.5,
        "positive": True,
        "observation": by_label["Pneumothorax"]["id"],
        "status": "preliminary",
    }
    cardio = clinical.finding_of(by_label["Cardiomegaly"])
    assert cardio is not None
    assert cardio["score"] == pytest.approx(0.12)
    assert cardio["positive"] is False


def test_a_probability_exactly_at_the_threshold_is_positive() -> None:
    fhir = FakeFhir()
    fhir.analyse(make_study(), {"Effusion": 0.5})
    obs = next(o for o in fhir.all("Observation") if clinical.finding_label(o) == "Effusion")
    found = clinical.finding_of(obs)
    assert found is not None
    assert found["positive"] is True


def _bare_observation(**extra: Any) -> Resource:
    obs: Resource = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "preliminary",
        "code": {"coding": [{"system": NIH, "code": "Mass"}]},
        "valueQuantity": {"value": 0.7},
    }
    obs.update(extra)
    return obs


def test_finding_of_without_band_or_threshold_is_never_positive() -> None:
    found = clinical.finding_of(_bare_observation())
    assert found is not None
    assert found["finding"] == "Mass"
    assert found["text"] == TERMINOLOGY.findings["Mass"].text
    assert (found["band_low"], found["band_high"], found["threshold"]) == (None, None, None)
    assert found["positive"] is False
    assert found["score_kind"] == "uncalibrated score" and found["band_kind"] is None


def test_uncalibrated_observations_are_scores_and_their_spread_is_named() -> None:
    fhir = FakeFhir()
    fhir.analyse(make_study(), analysis=make_analysis(calibrated=False, band_kind="tta-spread"))
    obs = next(o for o in fhir.all("Observation") if clinical.finding_label(o) == "Pneumothorax")
    found = clinical.finding_of(obs)
    assert found is not None
    assert found["score_kind"] == "uncalibrated score"
    assert found["band_kind"] == "spread over augmented views"


def test_an_unknown_label_keeps_its_code_as_text() -> None:
    obs = _bare_observation(code={"coding": [{"system": NIH, "code": "Covid_19"}]})
    found = clinical.finding_of(obs)
    assert found is not None
    assert (found["finding"], found["text"]) == ("Covid_19", "Covid_19")


@pytest.mark.parametrize(
    "obs",
    [
        # Only a SNOMED coding: not one of our findings.
        _bare_observation(
            code={"coding": [{"system": "http://snomed.info/sct", "code": "36118008"}]}
        ),
        _bare_observation(code={"text": "Pneumothorax"}),
        _bare_observation(valueQuantity={"unit": "1"}),
        {k: v for k, v in _bare_observation().items() if k != "valueQuantity"},
        {k: v for k, v in _bare_observation().items() if k != "code"},
    ],
)
def test_finding_of_skips_observations_that_are_not_findings(obs: Resource) -> None:
    assert clinical.finding_of(obs) is None


def test_urgency_key() -> None:
    def f(name: str, p: float, positive: bool) -> dict[str, Any]:
        return {"finding": name, "score": p, "positive": positive}

    assert clinical.urgency_key([]) == (0, 0.0, 0.0)
    # Non-critical findings do not count, however probable.
    assert clinical.urgency_key([f("Infiltration", 0.99, True)]) == (0, 0.0, 0.0)
    assert clinical.urgency_key(
        [f("Pneumothorax", 0.6, True), f("Edema", 0.8, True), f("Nodule", 0.95, True)]
    ) == (1, 0.8, 0.6)
    assert clinical.urgency_key([f("Pneumothorax", 0.45, False), f("Mass", 0.3, False)]) == (
        0,
        0.45,
        0.45,
    )
    assert set(clinical.CRITICAL_FINDINGS) <= set(TERMINOLOGY.findings)
    assert clinical.CRITICAL_FINDINGS[0] == "Pneumothorax"


# --- the worklist -------------------------------------------------------------------------------


def test_worklist_orders_by_urgency_then_pending_then_failed() -> None:
    fhir = FakeFhir()
    studies: dict[str, Resource] = {}
    # Posted oldest first: the pending/failed order below depends on it.
    for sid in ("ptx-b", "edema", "infiltrate", "ptx-below", "effusion", "ptx-a"):
        studies[sid] = posted_study(fhir, sid)
    studies["failed"] = posted_study(fhir, "failed")
    studies["pending-old"] = posted_study(fhir, "pending-old")
    studies["pending-new"] = posted_study(fhir, "pending-new")

    fhir.analyse(studies["ptx-a"], {"Pneumothorax": 0.9})
    fhir.analyse(studies["ptx-b"], {"Pneumothorax": 0.6})
    # Edema is more probable than either pneumothorax, but a positive pneumothorax wins.
    fhir.analyse(studies["edema"], {"Edema": 0.97, "Pneumothorax": 0.2})
    fhir.analyse(studies["effusion"], {"Effusion": 0.62})
    # Below its threshold a pneumothorax counts by probability only.
    fhir.analyse(studies["ptx-below"], {"Pneumothorax": 0.45})
    # A non-critical finding does not make a study urgent.
    fhir.analyse(studies["infiltrate"], {"Infiltration": 0.99})
    fhir.put(build_failed_task(studies["failed"], "truncated PNG", "undecodable-image"))

    expected = [
        "ptx-a",
        "ptx-b",
        "edema",
        "effusion",
        "ptx-below",
        "infiltrate",
        "pending-new",
        "pending-old",
        "failed",
    ]
    order = list(studies.values())
    assert ids(fhir.worklist(order)) == expected
    assert ids(fhir.worklist(order[::-1])) == expected

    rows = {r["id"]: r for r in fhir.worklist(order)}
    assert rows["ptx-a"]["pneumothorax_positive"] is True
    assert rows["ptx-a"]["urgency"] == pytest.approx(0.9)
    assert rows["edema"]["pneumothorax_positive"] is False
    assert rows["edema"]["urgency"] == pytest.approx(0.97)
    assert rows["ptx-below"]["pneumothorax_positive"] is False
    assert rows["infiltrate"]["urgency"] == pytest.approx(0.05)
    assert rows["infiltrate"]["top_findings"][0]["finding"] == "Infiltration"
    assert [r["status"] for r in fhir.worklist(order)] == ["done"] * 6 + ["pending"] * 2 + [
        "failed"
    ]


def test_a_done_row_carries_the_top_three_findings_and_the_report_status() -> None:
    fhir = FakeFhir()
    study = posted_study(
        fhir,
        "cxr-1",
        description="CHEST 1V",
        modality=[{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}],
    )
    fhir.analyse(study)  # Pneumothorax 0.9, Effusion 0.62, Atelectasis 0.31, Cardiomegaly 0.12
    [row] = fhir.worklist([study])
    assert row["status"] == "done"
    assert row["report_status"] == "preliminary"
    assert row["untrained"] is False
    top = [f["finding"] for f in row["top_findings"]]
    assert top == ["Pneumothorax", "Effusion", "Atelectasis"]
    assert [f["positive"] for f in row["top_findings"]] == [True, True, False]
    assert row["description"] == "CHEST 1V"
    assert row["modality"] == "DX"
    assert row["started"] == study["started"]
    # Time since posting counts from when the study reached the FHIR server.
    assert row["posted"] == study["meta"]["lastUpdated"]


def test_study_header_defaults() -> None:
    header = clinical.study_header({"resourceType": "ImagingStudy", "id": "s1"})
    assert header == {
        "id": "s1",
        "description": "Chest X-ray",
        "modality": "",
        "started": None,
        "posted": None,
    }


def test_a_failed_task_gives_its_reason_and_a_later_result_wins() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    reason = "pixel data is not a decodable image: truncated PNG"
    task = fhir.put(build_failed_task(study, reason, "undecodable-image"))
    [row] = fhir.worklist([study])
    assert (row["status"], row["reason"]) == ("failed", reason)
    assert "top_findings" not in row

    # The retry succeeds: the Task is completed and the report exists.
    fhir.put(build_completed_task(task))
    fhir.analyse(study)
    [row] = fhir.worklist([study])
    assert row["status"] == "done"

    # Even a Task still failed (the search is Task?status=failed) loses to a live report.
    [row] = clinical.worklist([study], fhir.all("DiagnosticReport"), fhir.observations(), [task])
    assert row["status"] == "done"


def test_a_completed_task_alone_is_pending_and_tasks_of_other_studies_do_not_count() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    other = posted_study(fhir, "cxr-2")
    completed = build_completed_task(build_failed_task(study, "no pixels", "no-pixels"))
    failed_other = build_failed_task(other, "no pixels", "no-pixels")
    [row] = clinical.worklist([study], [], {}, [completed, failed_other])
    assert row["status"] == "pending"
    assert clinical.failed_studies([completed, failed_other]) == {"cxr-2": "no pixels"}
    no_reason = dict(failed_other)
    del no_reason["statusReason"]
    assert clinical.failed_studies([no_reason]) == {"cxr-2": "failed"}


def test_a_superseded_report_is_ignored() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    old = fhir.analyse(study, {"Pneumothorax": 0.9})
    [row] = fhir.worklist([study])
    assert row["pneumothorax_positive"] is True

    # The image changed; the new result withdraws the old one in the same transaction.
    withdrawn = [r for r in old if r["resourceType"] in WITHDRAWN_WITH_A_REPORT]
    new = fhir.analyse(
        study,
        {"Pneumothorax": 0.1, "Effusion": 0.7},
        recorded=RECORDED + timedelta(hours=1),
        supersedes=withdrawn,
    )
    statuses = sorted(r["status"] for r in fhir.all("DiagnosticReport"))
    assert statuses == ["cancelled", "preliminary"]
    new_report = next(r for r in new if r["resourceType"] == "DiagnosticReport")

    [row] = fhir.worklist([study])
    assert row["status"] == "done"
    assert row["pneumothorax_positive"] is False
    assert row["urgency"] == pytest.approx(0.7)
    assert row["top_findings"][0]["finding"] == "Effusion"
    assert clinical.latest_reports(fhir.all("DiagnosticReport"))["cxr-1"]["id"] == new_report["id"]


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error", "unknown"])
def test_a_study_whose_only_report_is_withdrawn_is_pending(status: str) -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    fhir.analyse(study)
    [report] = fhir.all("DiagnosticReport")
    fhir.put({**report, "status": status})
    [row] = fhir.worklist([study])
    assert row["status"] == "pending"
    assert clinical.latest_reports(fhir.all("DiagnosticReport")) == {}


def test_of_two_live_reports_the_newest_issued_counts() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    # Posted newest first, so order of arrival cannot be what decides.
    fhir.analyse(study, {"Mass": 0.8}, recorded=RECORDED + timedelta(days=1))
    fhir.analyse(study, {"Pneumothorax": 0.9}, recorded=RECORDED)
    for reports in (fhir.all("DiagnosticReport"), fhir.all("DiagnosticReport")[::-1]):
        latest = clinical.latest_reports(reports)
        assert set(latest) == {"cxr-1"}
        found = clinical.study_findings(latest["cxr-1"], fhir.observations())
        assert max(found, key=lambda f: f["score"])["finding"] == "Mass"


def test_reports_without_a_study_reference_are_ignored() -> None:
    fhir = FakeFhir()
    fhir.analyse(make_study("cxr-1"))
    [report] = fhir.all("DiagnosticReport")
    orphan = {**report, "id": "r-orphan"}
    del orphan["imagingStudy"]
    elsewhere = {**report, "id": "r-other", "imagingStudy": [{"reference": "Patient/p1"}]}
    assert clinical.latest_reports([orphan, elsewhere]) == {}


def test_a_report_whose_observations_were_not_returned_is_done_without_findings() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    fhir.analyse(study)
    [row] = clinical.worklist([study], fhir.all("DiagnosticReport"), {}, [])
    assert row["status"] == "done"
    assert row["top_findings"] == []
    assert (row["urgency"], row["pneumothorax_positive"]) == (0.0, False)
    assert clinical.study_findings(None, fhir.observations()) == []


def test_study_findings_follow_the_report_results_only() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    fhir.analyse(study)
    [report] = fhir.all("DiagnosticReport")
    observations = fhir.observations()
    found = clinical.study_findings(report, observations)
    assert [f["finding"] for f in found] == [
        clinical.finding_label(observations[str(clinical.ref_id(r, "Observation"))])
        for r in report["result"]
    ]
    assert len(found) == 14
    # A result the server did not include (or that is no finding) is skipped.
    partial = {**report, "result": [*report["result"][:2], {"reference": "Observation/gone"}]}
    assert len(clinical.study_findings(partial, observations)) == 2


# --- untrained output ---------------------------------------------------------------------------


def test_untrained_output_is_flagged() -> None:
    fhir = FakeFhir()
    trained, untrained = posted_study(fhir, "cxr-1"), posted_study(fhir, "cxr-2")
    fhir.analyse(trained)
    fhir.analyse(untrained, untrained=True)
    rows = {r["id"]: r for r in fhir.worklist([trained, untrained])}
    assert rows["cxr-1"]["untrained"] is False
    assert rows["cxr-2"]["untrained"] is True


def test_untrained_is_read_from_the_report_or_any_observation_note() -> None:
    fhir = FakeFhir()
    fhir.analyse(make_study(), untrained=True)
    [report] = fhir.all("DiagnosticReport")
    observations = list(fhir.observations().values())
    assert clinical.is_untrained(report, observations) is True
    plain_report = {**report, "conclusion": "Preliminary AI triage."}
    assert clinical.is_untrained(plain_report, observations) is True
    assert clinical.is_untrained(plain_report, observations[:1]) is True
    plain_obs = [{k: v for k, v in o.items() if k != "note"} for o in observations]
    assert clinical.is_untrained(report, plain_obs) is True
    assert clinical.is_untrained(plain_report, plain_obs) is False
    assert clinical.is_untrained(None, [{"note": [{"text": UNTRAINED_NOTE}]}]) is True
    assert clinical.is_untrained(None, []) is False


# --- Media --------------------------------------------------------------------------------------


def test_input_media_is_the_newest_image_of_the_study_and_never_a_heatmap() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    heatmaps = [r for r in fhir.analyse(study) if r["resourceType"] == "Media"]
    assert len(heatmaps) == 2  # Pneumothorax and Effusion are positive
    old = input_media("cxr-1", mid="img-old", updated="2025-01-01T09:00:00.000+00:00")
    new = input_media("cxr-1", mid="img-new", updated="2025-01-01T10:00:00.000+00:00")
    wrong = input_media("cxr-1", mid="img-bad", updated="2025-01-03T10:00:00.000+00:00")
    other = input_media("cxr-2", mid="img-other", updated="2025-01-04T10:00:00.000+00:00")

    media = [*heatmaps, old, new, {**wrong, "status": "entered-in-error"}, other]
    for order in (media, media[::-1]):
        chosen = clinical.input_media(order, "cxr-1")
        assert chosen is not None
        assert chosen["id"] == "img-new"
    assert clinical.input_media([*heatmaps, {**new, "status": "not-done"}], "cxr-1") is None
    assert clinical.input_media(heatmaps, "cxr-1") is None
    assert clinical.input_media([old, new], "cxr-9") is None
    absolute = {**old, "partOf": [{"reference": "http://ehr.test/fhir/ImagingStudy/cxr-1"}]}
    chosen = clinical.input_media([absolute], "cxr-1")
    assert chosen is not None
    assert chosen["id"] == "img-old"


def test_heatmap_media_maps_each_positive_finding_to_its_overlay() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    fhir.analyse(study)
    fhir.analyse(posted_study(fhir, "cxr-2"), {"Mass": 0.9})
    media = [
        *fhir.all("Media"),
        input_media("cxr-1", mid="img", updated="2025-01-01T09:00:00.000+00:00"),
    ]
    stored = clinical.heatmap_media(media, "cxr-1")
    assert sorted(stored) == ["Effusion", "Pneumothorax"]
    for label, m in stored.items():
        assert [clinical.finding_label({"code": c}) for c in m["reasonCode"]] == [label]
        assert clinical.ref_id(m["partOf"][0], "ImagingStudy") == "cxr-1"
    assert sorted(clinical.heatmap_media(media, "cxr-2")) == ["Mass"]
    assert clinical.heatmap_media(media, "cxr-3") == {}
    erroneous = [{**m, "status": "entered-in-error"} for m in media]
    assert clinical.heatmap_media(erroneous, "cxr-1") == {}


def test_heatmaps_of_a_superseded_result_are_not_shown() -> None:
    fhir = FakeFhir()
    study = posted_study(fhir, "cxr-1")
    old = fhir.analyse(study)  # Pneumothorax and Effusion positive, each with an overlay
    new = fhir.analyse(
        study,
        {"Pneumothorax": 0.9},  # the new image shows no effusion
        recorded=RECORDED + timedelta(hours=1),
        supersedes=[r for r in old if r["resourceType"] in WITHDRAWN_WITH_A_REPORT],
    )
    [new_ptx] = [r for r in new if r["resourceType"] == "Media" and r["status"] == "completed"]
    assert sorted(m["status"] for m in fhir.all("Media")) == ["completed", "stopped", "stopped"]
    for media in (fhir.all("Media"), fhir.all("Media")[::-1]):
        stored = clinical.heatmap_media(media, "cxr-1")
        assert sorted(stored) == ["Pneumothorax"]
        assert stored["Pneumothorax"]["id"] == new_ptx["id"]
