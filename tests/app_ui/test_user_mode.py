"""The app's user mode (a user-level launch: all recent studies of every patient): which mode a
token response gives, the scopes asked, and the bounded FHIR reads behind the worklist, the
viewer and the similar panel.

No network: the EHR's FHIR base is an ``httpx.MockTransport`` over the resources the worker
writes (``build_result_transaction``, ``build_failed_task``).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from cxr_errors import FhirError, NotFoundError
from fhir_service.app_ui import clinical, smart
from fhir_service.app_ui.service import RECENT_STUDIES, AppUi, NotSignedIn
from fhir_service.app_ui.session import AppSession, Tokens
from fhir_service.dev_ehr import scopes
from fhir_service.fhir.results import build_result_transaction
from fhir_service.fhir.tasks import build_failed_task
from fhir_service.settings import CXR_APP_SCOPES, Settings
from tests.factories import RECORDED, make_analysis, make_heatmaps

T = TypeVar("T")
Resource = dict[str, Any]
ISS = "http://ehr.test/fhir"
T0 = 1_750_000_000.0
UNTRUSTED = "the token's issuer http://ehr.test/fhir is not trusted here"


# --- which mode a token response gives ------------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    [
        "launch openid patient/ImagingStudy.rs",
        "launch patient/ImagingStudy.rs user/ImagingStudy.rs",
        "launch",  # the launch context decides; the EHR answers 403 where scopes lack
    ],
)
def test_a_patient_in_the_token_response_means_patient_mode(scope: str) -> None:
    assert smart.launch_mode({"patient": "p1", "scope": scope}) == "patient"


@pytest.mark.parametrize(
    "scope",
    [
        "launch openid fhirUser user/ImagingStudy.rs user/Patient.rs",
        "launch user/ImagingStudy.read",  # SMART v1
        "launch user/*.rs",
        "user/ImagingStudy.r user/ImagingStudy.s",
        "user/ImagingStudy.cruds",
    ],
)
def test_user_scopes_without_a_patient_mean_user_mode(scope: str) -> None:
    assert smart.launch_mode({"scope": scope}) == "user"
    assert smart.launch_mode({"patient": "", "scope": scope}) == "user"


@pytest.mark.parametrize(
    "scope",
    [
        "launch openid fhirUser patient/ImagingStudy.rs",  # patient scopes, no patient
        "launch user/ImagingStudy.r",  # no search: no worklist
        "launch user/ImagingStudy.s",  # no read: no viewer
        "launch user/ImagingStudy.rs?status=available",  # granular: the app cannot honour it
        "launch user/Observation.rs user/Patient.rs",
        "launch system/ImagingStudy.rs",
        "",
    ],
)
def test_neither_patient_nor_user_access_is_a_clear_launch_error(scope: str) -> None:
    with pytest.raises(smart.LaunchError) as err:
        smart.launch_mode({"scope": scope})
    message = str(err.value)
    assert "neither a patient context nor user-level read and search of ImagingStudy" in message
    assert (scope or "nothing") in message


def test_user_permissions_reads_v1_v2_and_wildcards() -> None:
    granted = "user/ImagingStudy.read user/Media.r user/*.s patient/Task.rs user/Task.rs?x=1"
    assert smart.user_permissions(granted, "ImagingStudy") == frozenset("rs")
    assert smart.user_permissions(granted, "Media") == frozenset("rs")
    assert smart.user_permissions(granted, "Task") == frozenset("s")
    assert smart.user_permissions("user/Observation.*", "Observation") == frozenset("cruds")
    assert smart.user_permissions("", "Observation") == frozenset()


def test_the_ehr_launch_scopes_give_each_mode_through_the_dev_ehr() -> None:
    """The app asks for both scope kinds; the dev EHR's grant for each launch context makes
    :func:`smart.launch_mode` pick the matching mode."""
    for rtype in smart.RESOURCE_TYPES:
        assert f"patient/{rtype}.rs" in smart.EHR_SCOPES.split()
        assert f"user/{rtype}.rs" in smart.EHR_SCOPES.split()
        assert f"patient/{rtype}.rs" in smart.STANDALONE_SCOPES.split()
    assert not [s for s in smart.STANDALONE_SCOPES.split() if s.startswith("user/")]
    assert "launch/patient" in smart.STANDALONE_SCOPES.split()
    assert "launch/patient" not in smart.EHR_SCOPES.split()

    as_patient = scopes.grant(smart.EHR_SCOPES, CXR_APP_SCOPES, ehr_launch=True, context="patient")
    as_user = scopes.grant(smart.EHR_SCOPES, CXR_APP_SCOPES, ehr_launch=True, context="user")
    assert smart.launch_mode({"patient": "p1", "scope": " ".join(as_patient)}) == "patient"
    assert smart.launch_mode({"scope": " ".join(as_user)}) == "user"
    assert sorted(s for s in as_user if "/" in s) == sorted(
        [*smart.USER_RESOURCE_SCOPES.split(), *smart.USER_WRITE_SCOPES.split()]
    )
    assert sorted(s for s in as_patient if "/" in s) == sorted(
        [*smart.RESOURCE_SCOPES.split(), *smart.WRITE_SCOPES.split()]
    )


def _jwt(claims: Mapping[str, Any]) -> str:
    def part(value: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def test_id_token_claims_for_display() -> None:
    token = _jwt({"sub": "u", "fhirUser": "http://ehr.test/fhir/Practitioner/dr-1"})
    assert smart.id_token_claims(token)["fhirUser"] == "http://ehr.test/fhir/Practitioner/dr-1"
    for bad in (None, "", "a.b", "a.!!!.c", f"x.{base64.urlsafe_b64encode(b'[1]').decode()}.y"):
        assert smart.id_token_claims(bad) == {}


# --- patients in rows ---------------------------------------------------------------------------


def test_patient_label_and_study_patients() -> None:
    named = {"resourceType": "Patient", "id": "p1", "name": [{"given": ["Ann"], "family": "Lee"}]}
    texted = {"resourceType": "Patient", "id": "p2", "name": [{"text": "Bo Chen"}]}
    assert clinical.patient_label(named, "p1") == "Ann Lee"
    assert clinical.patient_label(texted, "p2") == "Bo Chen"
    assert clinical.patient_label({"resourceType": "Patient", "id": "p3"}, "p3") == "Patient p3"
    assert clinical.patient_label(None, "p4") == "Patient p4"
    studies = [
        {"resourceType": "ImagingStudy", "id": "s1", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "ImagingStudy", "id": "s4", "subject": {"reference": f"{ISS}/Patient/p4"}},
        {"resourceType": "ImagingStudy", "id": "s0"},
    ]
    assert clinical.study_patients(studies, {"p1": named}) == {
        "s1": {"id": "p1", "name": "Ann Lee"},
        "s4": {"id": "p4", "name": "Patient p4"},
    }


# --- the bounded reads of user mode, against a fake EHR ------------------------------------------


class FakeEhr:
    """A FHIR base holding the worker's resources; answers the searches the app makes and
    records them. ``forbidden`` types answer 403, as an EHR does for types not granted."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], Resource] = {}
        self.requests: list[httpx.Request] = []
        self.forbidden: set[str] = set()
        self.similar: list[str] = []
        #: ``$similar`` answers 401, as the cxr service behind an EHR it does not trust does.
        self.similar_refused = False
        self._ids = itertools.count(1)
        self._stamp = itertools.count(10)

    def put(self, resource: Mapping[str, Any]) -> Resource:
        res = copy.deepcopy(dict(resource))
        res.setdefault("id", f"{str(res['resourceType']).lower()}-{next(self._ids)}")
        res["meta"] = {"lastUpdated": f"2025-01-02T08:00:{next(self._stamp):02d}.000+00:00"}
        self.store[(str(res["resourceType"]), str(res["id"]))] = res
        return res

    def all(self, rtype: str) -> list[Resource]:
        return [r for (t, _), r in self.store.items() if t == rtype]

    def patient(self, pid: str, name: str | None) -> None:
        res: Resource = {"resourceType": "Patient", "id": pid}
        if name:
            res["name"] = [{"text": name}]
        self.put(res)

    def study(self, sid: str, pid: str) -> Resource:
        return self.put(
            {"resourceType": "ImagingStudy", "id": sid, "subject": {"reference": f"Patient/{pid}"}}
        )

    def analyse(self, study: Resource, probabilities: Mapping[str, float]) -> None:
        analysis = make_analysis(probabilities, untrained=True)
        bundle = build_result_transaction(
            study,
            analysis,
            make_heatmaps(analysis),
            image_sha256=f"{next(self._ids):064x}",
            recorded=RECORDED,
            supersedes=[],
        )
        urns = {}
        for entry in bundle["entry"]:
            res = entry["resource"]
            res["id"] = f"{str(res['resourceType']).lower()}-{next(self._ids)}"
            urns[entry["fullUrl"]] = f"{res['resourceType']}/{res['id']}"
        for entry in bundle["entry"]:
            text = json.dumps(entry["resource"])
            for urn, ref in urns.items():
                text = text.replace(f'"{urn}"', f'"{ref}"')
            self.put(json.loads(text))

    def fail(self, study: Resource, reason: str) -> None:
        self.put(build_failed_task(study, reason, "undecodable-image"))

    def bundle(self, resources: list[Resource]) -> httpx.Response:
        entries = [{"resource": r} for r in resources]
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers["authorization"] == "Bearer at-1"
        path = request.url.path.removeprefix("/fhir/").split("/")
        q = request.url.params
        if path[0] in self.forbidden:
            return httpx.Response(403, json={"resourceType": "OperationOutcome"})
        if path[-1] == "$similar" and self.similar_refused:
            outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": UNTRUSTED}]}
            return httpx.Response(401, json=outcome)
        if path[-1] == "$similar":
            return self.bundle([self.store[("ImagingStudy", s)] for s in self.similar])
        if len(path) == 2:
            found = self.store.get((path[0], path[1]))
            return httpx.Response(200, json=found) if found else httpx.Response(404, json={})
        return self.search(path[0], q)

    def search(self, rtype: str, q: httpx.QueryParams) -> httpx.Response:
        found = self.all(rtype)
        if rtype == "ImagingStudy":
            assert q["_sort"] == "-_lastUpdated"
            found.sort(key=lambda r: r["meta"]["lastUpdated"], reverse=True)
            found = found[: int(q["_count"])]
            if q.get("_include") == "ImagingStudy:subject" and "Patient" not in self.forbidden:
                pids = {clinical.ref_id(s["subject"], "Patient") for s in found}
                found += [p for p in self.all("Patient") if p["id"] in pids]
        elif rtype == "DiagnosticReport":
            # Patient mode reads them all; user mode by study, live ones only.
            refs = set(q.get("result:Observation.derived-from", "").split(","))
            statuses = set(q.get("status", "").split(","))
            obs = {str(o["id"]): o for o in self.all("Observation")}

            def matches(report: Resource) -> bool:
                if "result:Observation.derived-from" not in q:
                    return True
                results = [obs[str(clinical.ref_id(r, "Observation"))] for r in report["result"]]
                return report["status"] in statuses and any(
                    d["reference"] in refs for o in results for d in o.get("derivedFrom", [])
                )

            found = [r for r in found if matches(r)]
            assert q["_include"] == "DiagnosticReport:result"
            found += [
                obs[str(clinical.ref_id(r, "Observation"))] for d in found for r in d["result"]
            ]
        elif rtype == "Task":
            if "focus" in q:
                found = [t for t in found if t["focus"]["reference"] in q["focus"].split(",")]
            if "status" in q:
                found = [t for t in found if t["status"] == q["status"]]
            if "priority" in q:
                found = [t for t in found if t.get("priority") in q["priority"].split(",")]
        elif rtype == "Patient":
            found = [p for p in found if p["id"] in q["_id"].split(",")]
        elif rtype == "Media":
            found = [
                m for m in found if q["part-of"] in [p["reference"] for p in m.get("partOf", [])]
            ]
        return self.bundle(found)

    def searched(self, rtype: str) -> list[httpx.QueryParams]:
        return [r.url.params for r in self.requests if r.url.path == f"/fhir/{rtype}"]


class Harness:
    def __init__(self, tmp_path: Path, mode: smart.Mode = "user") -> None:
        self.ehr = FakeEhr()
        settings = Settings(data_dir=tmp_path, model_weights="untrained", clip_weights="untrained")
        self.ui = AppUi(settings, transport=httpx.MockTransport(self.ehr), clock=lambda: T0)
        self.session: AppSession = self.ui.sessions.new()
        self.session.iss = ISS
        self.session.token_endpoint = "http://ehr.test/auth/token"
        self.session.mode = mode
        self.session.tokens = Tokens(
            access_token="at-1",
            expires_at=T0 + 3600,
            scope=smart.USER_RESOURCE_SCOPES if mode == "user" else smart.RESOURCE_SCOPES,
            patient="p1" if mode == "patient" else None,
        )

    def run(self, call: Callable[[AppUi], Coroutine[Any, Any, T]]) -> T:
        async def go() -> T:
            try:
                return await call(self.ui)
            finally:
                await self.ui.aclose()

        return asyncio.run(go())


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    h = Harness(tmp_path)
    ehr = h.ehr
    ehr.patient("p1", "Ann Lee")
    ehr.patient("p2", None)
    calm = ehr.study("calm", "p1")
    ptx = ehr.study("ptx", "p2")
    edema = ehr.study("edema", "p1")
    ehr.study("waiting", "p2")
    broken = ehr.study("broken", "p1")
    ehr.analyse(calm, {"Pneumothorax": 0.1})
    ehr.analyse(ptx, {"Pneumothorax": 0.9})
    ehr.analyse(edema, {"Pneumothorax": 0.2, "Edema": 0.7})
    ehr.fail(broken, "the image cannot be decoded")
    return h


def test_user_worklist_is_every_patients_recent_studies_by_urgency(h: Harness) -> None:
    rows = h.run(lambda ui: ui.worklist(h.session))
    assert [r["id"] for r in rows] == ["ptx", "edema", "calm", "waiting", "broken"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "pending", "failed"]
    assert {r["id"]: r["patient"] for r in rows} == {
        "ptx": {"id": "p2", "name": "Patient p2"},
        "edema": {"id": "p1", "name": "Ann Lee"},
        "calm": {"id": "p1", "name": "Ann Lee"},
        "waiting": {"id": "p2", "name": "Patient p2"},
        "broken": {"id": "p1", "name": "Ann Lee"},
    }
    assert rows[-1]["reason"] == "the image cannot be decoded"
    assert rows[0]["pneumothorax_positive"] is True


def test_user_worklist_reads_a_fixed_number_of_bounded_searches(h: Harness) -> None:
    h.run(lambda ui: ui.worklist(h.session))
    assert [r.url.path for r in h.ehr.requests].count("/fhir/ImagingStudy") == 1
    (studies,) = h.ehr.searched("ImagingStudy")
    assert studies["_count"] == str(RECENT_STUDIES)
    assert studies["_include"] == "ImagingStudy:subject"
    (reports,) = h.ehr.searched("DiagnosticReport")
    ids = {"calm", "ptx", "edema", "waiting", "broken"}
    assert set(reports["result:Observation.derived-from"].split(",")) == {
        f"ImagingStudy/{s}" for s in ids
    }
    assert "cancelled" not in reports["status"].split(",")
    failed, ordered = h.ehr.searched("Task")  # failed analyses; orders with a priority
    for tasks in (failed, ordered):
        assert set(tasks["focus"].split(",")) == {f"ImagingStudy/{s}" for s in ids}
    assert ordered["priority"] == "stat,asap,urgent,routine"
    # No study is basedOn a ServiceRequest here, so none is read.
    assert len(h.ehr.requests) == 4
    assert not [r for r in h.ehr.requests if "patient" in r.url.params]


def test_user_worklist_shows_at_most_the_recent_studies(h: Harness) -> None:
    for i in range(RECENT_STUDIES + 5):
        h.ehr.study(f"extra-{i}", "p2")
    rows = h.run(lambda ui: ui.worklist(h.session))
    assert len(rows) == RECENT_STUDIES
    (reports,) = h.ehr.searched("DiagnosticReport")
    assert len(reports["result:Observation.derived-from"].split(",")) == RECENT_STUDIES


def test_user_worklist_without_patient_access_shows_ids(h: Harness) -> None:
    h.ehr.forbidden.add("Patient")
    rows = h.run(lambda ui: ui.worklist(h.session))
    assert {r["patient"]["name"] for r in rows} == {"Patient p1", "Patient p2"}


def test_user_study_reads_only_that_study_and_names_its_patient(h: Harness) -> None:
    study = h.run(lambda ui: ui.study(h.session, "ptx"))
    assert study["status"] == "done"
    assert study["patient"] == {"id": "p2", "name": "Patient p2"}
    assert len(study["findings"]) == 14
    (reports,) = h.ehr.searched("DiagnosticReport")
    assert reports["result:Observation.derived-from"] == "ImagingStudy/ptx"
    assert h.ehr.searched("ImagingStudy") == [], "no worklist search behind the viewer"


def test_user_study_that_is_not_readable_is_not_found(h: Harness) -> None:
    with pytest.raises(NotFoundError):
        h.run(lambda ui: ui.study(h.session, "nope"))


def test_user_similar_names_patients_and_same_patient_is_the_queried_studys(h: Harness) -> None:
    h.ehr.similar = ["edema", "ptx", "waiting"]
    results = h.run(lambda ui: ui.similar(h.session, "calm", {"count": "3"}))
    assert [r["id"] for r in results] == ["edema", "ptx", "waiting"]
    assert [r["same_patient"] for r in results] == [True, False, False]
    assert [r["patient"]["name"] for r in results] == ["Ann Lee", "Patient p2", "Patient p2"]
    assert [r["status"] for r in results] == ["done", "done", "pending"]
    assert results[1]["findings"][0]["finding"] == "Pneumothorax"
    (patients,) = h.ehr.searched("Patient")
    assert set(patients["_id"].split(",")) == {"p1", "p2"}


def test_user_text_similar_has_no_same_patient(h: Harness) -> None:
    h.ehr.similar = ["edema", "ptx"]
    results = h.run(lambda ui: ui.similar(h.session, None, {"text": "effusion"}))
    assert [r["same_patient"] for r in results] == [False, False]
    assert [r["patient"]["id"] for r in results] == ["p1", "p2"]


def test_patient_mode_similar_keeps_the_launch_patient(tmp_path: Path) -> None:
    h = Harness(tmp_path, mode="patient")
    h.ehr.patient("p1", "Ann Lee")
    h.ehr.similar = [h.ehr.study("a", "p1")["id"]]
    results = h.run(lambda ui: ui.similar(h.session, "a", {}))
    assert [(r["same_patient"], r["patient"]) for r in results] == [(True, None)]
    assert h.ehr.searched("Patient") == [], "patient mode names no other patients"


@pytest.mark.parametrize("mode", ["user", "patient"])
def test_a_refused_similar_is_an_error_of_the_panel_not_a_sign_out(
    tmp_path: Path, mode: smart.Mode
) -> None:
    """The cxr service behind the EHR answers ``$similar`` (through it); its 401 (it does not
    trust this EHR's tokens, or not yet its new key) must not end a launch the EHR accepts."""
    h = Harness(tmp_path, mode=mode)
    h.ehr.patient("p1", "Ann Lee")
    h.ehr.analyse(h.ehr.study("a", "p1"), {"Effusion": 0.4})
    h.ehr.similar_refused = True

    async def similar_then_worklist(ui: AppUi) -> list[dict[str, Any]]:
        with pytest.raises(FhirError, match=f"refused this launch's token: {UNTRUSTED}"):
            await ui.similar(h.session, "a", {})
        return await ui.worklist(h.session)

    rows = h.run(similar_then_worklist)
    assert h.session.tokens is not None
    assert [r["id"] for r in rows] == ["a"]


def test_no_mode_is_not_signed_in(h: Harness) -> None:
    h.session.mode = None
    with pytest.raises(NotSignedIn):
        h.run(lambda ui: ui.worklist(h.session))
