"""The app keeps a patient launch to its patient by itself, against an EHR that does not.

``FakeEhr`` (from the user-mode tests) ignores any ``patient`` parameter and answers every
search with every patient's resources, as a standard SMART server may. In patient mode every
search and ``$similar`` call must still name the launch's patient, every resource that comes
back must be checked against it, and a direct read of another patient's resource refused and
logged. In user mode the ``user/`` scopes decide which types are read and shown.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest

from cxr_errors import ForbiddenError, NotFoundError
from fhir_service.app_ui import smart
from fhir_service.app_ui.access import LaunchAccess, patient_of
from fhir_service.app_ui.service import AppUi
from tests.app_ui.test_user_mode import Harness
from tests.factories import make_png

Resource = dict[str, Any]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    """A patient launch for p1 against an EHR holding p1's and p2's studies and results."""
    h = Harness(tmp_path, mode="patient")
    ehr = h.ehr
    ehr.patient("p1", "Ann Lee")
    ehr.patient("p2", "Bo Chen")
    for sid, pid, ptx in (("mine-1", "p1", 0.2), ("mine-2", "p1", 0.3), ("theirs", "p2", 0.9)):
        ehr.analyse(ehr.study(sid, pid), {"Pneumothorax": ptx})
        ehr.put(_input_media(sid, pid))
    ehr.fail(ehr.study("their-broken", "p2"), "the image cannot be decoded")
    return h


def _input_media(study: str, patient: str) -> Resource:
    return {
        "resourceType": "Media",
        "status": "completed",
        "partOf": [{"reference": f"ImagingStudy/{study}"}],
        "subject": {"reference": f"Patient/{patient}"},
        "content": {"contentType": "image/png", "data": base64.b64encode(make_png()).decode()},
    }


def _subjects(resources: list[Resource]) -> set[str | None]:
    return {patient_of(r) for r in resources}


# --- what a patient launch asks for and shows -------------------------------------------------


def test_every_search_of_a_patient_launch_names_the_launch_patient(h: Harness) -> None:
    h.run(lambda ui: ui.worklist(h.session))
    searched = [r for r in h.ehr.requests if "$similar" not in r.url.path]
    assert {r.url.path for r in searched} == {
        "/fhir/ImagingStudy",
        "/fhir/DiagnosticReport",
        "/fhir/Task",
        "/fhir/ServiceRequest",
    }
    assert [r.url.params.get("patient") for r in searched] == ["p1"] * len(searched)


def test_the_worklist_shows_only_the_launch_patients_studies(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fhir_service.app_ui.access"):
        rows = h.run(lambda ui: ui.worklist(h.session))
    # "theirs" has a positive pneumothorax and would rank first if it leaked in.
    assert sorted(r["id"] for r in rows) == ["mine-1", "mine-2"]
    assert all(r["status"] == "done" for r in rows)
    withheld = [r.getMessage() for r in caplog.records]
    assert any("ImagingStudy/theirs" in m and "Patient/p2" in m for m in withheld)
    assert any(m.startswith("withheld DiagnosticReport/") for m in withheld)
    assert any(m.startswith("withheld Observation/") for m in withheld)
    assert any(m.startswith("withheld Task/") for m in withheld)


def test_reports_observations_and_tasks_of_other_patients_are_withheld(h: Harness) -> None:
    studies, reports, observations, tasks = h.run(lambda ui: ui.patient_data(h.session))
    assert _subjects(studies) == {"p1"}
    assert _subjects(reports) == {"p1"}
    assert _subjects(list(observations.values())) == {"p1"}
    assert tasks == []


def test_another_patients_study_is_refused_and_logged(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="fhir_service.app_ui.access"),
        pytest.raises(ForbiddenError, match="ImagingStudy/theirs is outside this launch"),
    ):
        h.run(lambda ui: ui.study(h.session, "theirs"))
    assert any("ImagingStudy/theirs" in r.getMessage() for r in caplog.records)


def test_the_launch_patients_study_opens(h: Harness) -> None:
    study = h.run(lambda ui: ui.study(h.session, "mine-1"))
    assert study["status"] == "done" and len(study["findings"]) == 14


def test_similar_names_the_patient_and_withholds_other_patients_matches(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.ehr.similar = ["theirs", "mine-2", "their-broken"]
    with caplog.at_level(logging.WARNING, logger="fhir_service.app_ui.access"):
        results = h.run(
            lambda ui: ui.similar(h.session, "mine-1", {"count": "5", "exclude-same-patient": "1"})
        )
    assert [r["id"] for r in results] == ["mine-2"]
    assert [r["same_patient"] for r in results] == [True]
    (call,) = [r for r in h.ehr.requests if r.url.path.endswith("$similar")]
    assert call.url.path == "/fhir/ImagingStudy/mine-1/$similar"
    assert call.url.params["patient"] == "p1"
    assert "exclude-same-patient" not in call.url.params
    assert {"ImagingStudy/theirs", "ImagingStudy/their-broken"} <= {
        r.getMessage().split()[1] for r in caplog.records
    }


def test_text_similar_is_bound_to_the_patient_too(h: Harness) -> None:
    h.ehr.similar = ["theirs", "mine-1"]
    results = h.run(lambda ui: ui.similar(h.session, None, {"text": "effusion"}))
    assert [r["id"] for r in results] == ["mine-1"]
    (call,) = [r for r in h.ehr.requests if r.url.path.endswith("$similar")]
    assert call.url.params["patient"] == "p1"


def test_similar_to_another_patients_study_is_refused_before_searching(h: Harness) -> None:
    h.ehr.similar = ["theirs"]
    with pytest.raises(ForbiddenError):
        h.run(lambda ui: ui.similar(h.session, "theirs", {}))
    assert not [r for r in h.ehr.requests if r.url.path.endswith("$similar")]


def test_another_patients_image_is_not_served(h: Harness) -> None:
    async def both(ui: AppUi) -> bytes:
        data, _ = await ui.image(h.session, "mine-1")
        with pytest.raises(NotFoundError):
            await ui.image(h.session, "theirs")
        return data

    assert h.run(both).startswith(b"\x89PNG")
    media = [r for r in h.ehr.requests if r.url.path == "/fhir/Media"]
    assert [r.url.params["patient"] for r in media] == ["p1", "p1"]


def test_a_patient_read_that_answers_another_patient_is_refused(h: Harness) -> None:
    h.ehr.store[("Patient", "p1")] = {"resourceType": "Patient", "id": "p2"}
    with pytest.raises(ForbiddenError):
        h.run(lambda ui: ui.read(h.session, "Patient", "p1"))


# --- user mode follows the user's scopes ------------------------------------------------------


def test_a_user_launch_reads_only_the_types_its_scopes_grant(tmp_path: Path) -> None:
    h = Harness(tmp_path, mode="user")
    assert h.session.tokens is not None
    h.session.tokens.scope = "user/ImagingStudy.rs user/DiagnosticReport.rs"
    h.ehr.patient("p1", "Ann Lee")
    study = h.ehr.study("s1", "p1")
    h.ehr.analyse(study, {"Pneumothorax": 0.2})
    h.ehr.fail(h.ehr.study("s2", "p1"), "bad pixels")
    rows = h.run(lambda ui: ui.worklist(h.session))
    paths = {r.url.path for r in h.ehr.requests}
    assert "/fhir/Task" not in paths and "/fhir/Patient" not in paths
    (studies,) = h.ehr.searched("ImagingStudy")
    assert "_include" not in studies, "Patient is not granted: not asked for"
    # Observations are not granted: the report's findings are not shown.
    assert {r["id"]: r.get("top_findings") for r in rows}["s1"] == []
    assert {r["patient"]["name"] for r in rows} == {"Patient p1"}


# --- the checks themselves --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "patient"),
    [
        ({"resourceType": "ImagingStudy", "subject": {"reference": "Patient/p1"}}, "p1"),
        (
            {"resourceType": "Observation", "subject": {"reference": "http://e/fhir/Patient/p1"}},
            "p1",
        ),
        ({"resourceType": "Media", "subject": {"reference": "Patient/p1/_history/3"}}, "p1"),
        ({"resourceType": "Task", "for": {"reference": "Patient/p1"}}, "p1"),
        ({"resourceType": "Task", "subject": {"reference": "Patient/p1"}}, None),
        ({"resourceType": "ImagingStudy", "subject": {"reference": "Group/p1"}}, None),
        ({"resourceType": "ImagingStudy", "subject": {"reference": "#p1"}}, None),
        ({"resourceType": "ImagingStudy", "subject": {"identifier": {"value": "p1"}}}, None),
        (
            {"resourceType": "ImagingStudy", "subject": {"reference": "Patient/p1?x=Patient/p2"}},
            None,
        ),
        ({"resourceType": "ImagingStudy"}, None),
        ({"resourceType": "Device", "patient": {"reference": "Patient/p1"}}, None),
        ({"resourceType": "Patient", "id": "p1"}, "p1"),
    ],
)
def test_patient_of(resource: Resource, patient: str | None) -> None:
    assert patient_of(resource) == patient


def test_search_params_replace_any_patient_the_caller_named() -> None:
    access = LaunchAccess(mode="patient", patient="p1", scope=smart.RESOURCE_SCOPES)
    bound = access.search_params(
        "ImagingStudy", {"patient": "p2", "subject:Patient": "p2", "subject.name": "x", "a": "b"}
    )
    assert bound == {"patient": "p1", "a": "b"}
    assert access.search_params("Patient", {"_id": "p2"}) == {"_id": "p1"}
    with pytest.raises(ForbiddenError):
        access.search_params("Device", {})


def test_a_patient_launch_without_a_patient_is_refused() -> None:
    with pytest.raises(ForbiddenError):
        LaunchAccess(mode="patient", patient=None, scope="")
