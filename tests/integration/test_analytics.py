"""``findings_frame`` (fhirclient → pandas) against the real stack: two NIH sample studies go
through HAPI, the rest-hook, the queue and the (untrained) worker; the frame is then checked
Observation by Observation against what HAPI holds. Then the same reads through the dev
EHR's token-checking proxy: a SMART standalone launch driven by fhirclient (user level,
across patients), and a patient-bound token that cannot read Devices."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from cxr_errors import FhirError
from fhir_service.analytics import COLUMNS, BearerToken, StandaloneLaunch, findings_frame
from fhir_service.fhir.terminology import TERMINOLOGY
from fhir_service.ops.stack import start_dev_ehr, stop_dev_ehr
from fhir_service.settings import DevEhrClient, Settings
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

Resource = dict[str, Any]
NIH = TERMINOLOGY.code_system_url("nih_label")
BAND_KINDS = {
    TERMINOLOGY.extension_url("ai_confidence"): "confidence",
    TERMINOLOGY.extension_url("tta_spread"): "tta-spread",
}
SCORE_KINDS = ("calibrated probability", "uncalibrated score")
ANALYST = "cxr-analytics-test"
REDIRECT = "http://analyst.test/callback"


@dataclass
class Posted:
    studies: list[str]
    observations: list[Resource]
    devices: dict[str, Resource]
    frame: pd.DataFrame

    def patient_of(self, study: str) -> str:
        row = self.frame[self.frame["study"] == study].iloc[0]
        return str(row["patient"])


@pytest.fixture(scope="module")
def posted(stack: Stack) -> Posted:
    tag = unique_suffix()
    studies = [stack.post_study(i, tag=tag) for i in (0, 1)]  # NIH patients 3 and 13
    for sid in studies:
        wait_for(f"a report for {sid}", lambda sid=sid: stack.reports(sid))
    observations = [
        obs
        for sid in studies
        for obs in stack.fhir.search_all("Observation", {"derived-from": f"ImagingStudy/{sid}"})
    ]
    refs = {o["device"]["reference"] for o in observations}
    devices = {ref: stack.fhir.read_reference(ref) for ref in refs}
    frame = findings_frame(stack.settings.fhir_base_url, study=studies)
    return Posted(studies, observations, devices, frame)


def _ref_id(reference: str) -> str:
    return reference.rsplit("/", 1)[1]


def _expected_row(obs: Resource, devices: dict[str, Resource]) -> dict[str, Any]:
    codings = obs["code"]["coding"]
    bands = [
        (e["valueRange"], kind)
        for e in obs.get("extension", [])
        for url, kind in BAND_KINDS.items()
        if e["url"] == url
    ]
    (band, band_kind) = bands[0] if bands else ({}, None)
    interpretation = obs["interpretation"][0]["text"]
    (threshold,) = [
        c["valueQuantity"]["value"]
        for c in obs["component"]
        if c["code"]["coding"][0]["code"] == "operating-threshold"
    ]
    return {
        "study": _ref_id(obs["derivedFrom"][0]["reference"]),
        "patient": _ref_id(obs["subject"]["reference"]),
        "finding": next(c["code"] for c in codings if c["system"] == NIH),
        "finding_system": codings[0]["system"],
        "finding_code": codings[0]["code"],
        "score": obs["valueQuantity"]["value"],
        "score_kind": next(k for k in SCORE_KINDS if interpretation.startswith(k)),
        "band_low": band.get("low", {}).get("value"),
        "band_high": band.get("high", {}).get("value"),
        "band_kind": band_kind,
        "flag": obs["interpretation"][0]["coding"][0]["code"],
        "threshold": threshold,
        "model_version": devices[obs["device"]["reference"]]["version"][0]["value"],
        "status": obs["status"],
        "issued": pd.Timestamp(obs["issued"]),
    }


def test_frame_equals_what_hapi_holds(stack: Stack, posted: Posted) -> None:
    frame = posted.frame
    assert tuple(frame.columns) == COLUMNS
    assert frame.groupby("study").size().to_dict() == {sid: 14 for sid in posted.studies}
    assert frame["patient"].nunique() == 2
    assert sorted(frame["observation"]) == sorted(o["id"] for o in posted.observations)
    by_id = frame.set_index("observation")
    for obs in posted.observations:
        row = by_id.loc[obs["id"]]
        for column, value in _expected_row(obs, posted.devices).items():
            assert row[column] == value, (obs["id"], column)
    # The untrained test model is marked on every row, and the version is the worker's.
    assert frame["untrained"].all()
    (version,) = set(frame["model_version"])
    assert version.startswith(stack.model_version) and "untrained" in version.lower()
    assert set(frame["flag"]) <= {"POS", "NEG"}
    assert str(frame["issued"].dtype) == "datetime64[ns, UTC]"


def test_paging_and_filters_on_the_real_server(stack: Stack, posted: Posted) -> None:
    base = stack.settings.fhir_base_url
    paged = findings_frame(base, study=posted.studies, page_size=5)  # 6 pages + includes
    pd.testing.assert_frame_equal(paged, posted.frame)

    for code in ("Pneumothorax", "36118008", "http://snomed.info/sct|36118008"):
        found = findings_frame(base, study=posted.studies, code=code)
        assert sorted(found["study"]) == sorted(posted.studies), code
        assert set(found["finding"]) == {"Pneumothorax"}, code

    first = posted.studies[0]
    mine = findings_frame(base, patient=posted.patient_of(first), study=posted.studies)
    assert set(mine["study"]) == {first} and len(mine) == 14

    issued = posted.frame["issued"]
    before = findings_frame(base, study=posted.studies, since=issued.min() - pd.Timedelta("1s"))
    assert len(before) == 28
    after = findings_frame(base, study=posted.studies, since=issued.max() + pd.Timedelta("1s"))
    assert after.empty and tuple(after.columns) == COLUMNS
    assert len(findings_frame(base, study=posted.studies, limit=3)) == 3


def test_readme_example_runs(stack: Stack, posted: Posted) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Analytics (Python)", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8080/fhir" in example
    code = example.replace("http://127.0.0.1:8080/fhir", stack.settings.fhir_base_url)
    out, names = io.StringIO(), dict[str, Any]()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), names)
    assert "score_kind" in out.getvalue()
    assert set(posted.frame["observation"]) <= set(names["df"]["observation"])
    assert set(names["pneumothorax"]["finding"]) == {"Pneumothorax"}
    assert len(names["everything"]) >= len(names["df"])


# --- through the dev EHR's token-checking proxy -------------------------------------------------


@pytest.fixture(scope="module")
def dev_ehr(stack: Stack) -> Iterator[Settings]:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    analyst = DevEhrClient(
        client_id=ANALYST,
        redirect_uris=[REDIRECT],
        scope="openid fhirUser launch/patient user/Observation.rs user/Device.rs "
        "patient/Observation.rs",
    )
    settings = stack.settings.model_copy(
        update={"dev_ehr_port": 18006 + offset, "dev_ehr_clients": [analyst]}
    )
    stop_dev_ehr(settings)
    start_dev_ehr(settings)
    try:
        yield settings
    finally:
        stop_dev_ehr(settings)


def test_standalone_launch_by_fhirclient_reads_through_the_proxy(
    dev_ehr: Settings, posted: Posted
) -> None:
    base = dev_ehr.dev_ehr_fhir_url
    with pytest.raises(FhirError, match="401"):
        findings_frame(base, study=posted.studies)

    launch = StandaloneLaunch(base, client_id=ANALYST, redirect_uri=REDIRECT)
    # The analyst's browser: asking no patient, the dev EHR signs in and redirects at once.
    signed_in = httpx.get(launch.authorize_url, follow_redirects=False, timeout=30)
    assert signed_in.status_code == 302, signed_in.text
    launch.finish(signed_in.headers["location"])
    assert launch.patient is None
    frame = findings_frame(base, study=posted.studies, auth=launch, page_size=5)
    pd.testing.assert_frame_equal(frame, posted.frame)


def test_patient_token_sees_one_patient_and_no_device(dev_ehr: Settings, posted: Posted) -> None:
    base = dev_ehr.dev_ehr_fhir_url
    first = posted.studies[0]
    patient = posted.patient_of(first)
    launch = StandaloneLaunch(
        base,
        client_id=ANALYST,
        redirect_uri=REDIRECT,
        scope="launch/patient patient/Observation.rs",
    )
    with httpx.Client(base_url=dev_ehr.dev_ehr_url, timeout=30) as browser:
        picker = browser.get(launch.authorize_url)
        assert picker.status_code == 200 and patient in picker.text
        request_id = re.search(r"name='request' value='([^']+)'", picker.text)
        assert request_id is not None
        chosen = browser.post(
            "/auth/authorize/select", data={"request": request_id.group(1), "patient": patient}
        )
    assert chosen.status_code == 303, chosen.text
    launch.finish(chosen.headers["location"])
    assert launch.patient == patient and launch.access_token

    token = BearerToken(launch.access_token)
    frame = findings_frame(base, study=posted.studies, auth=token)
    expected = posted.frame[posted.frame["study"] == first].reset_index(drop=True)
    # Devices are outside the patient compartment: no model version, still marked untrained.
    assert frame["model_version"].isna().all() and frame["untrained"].all()
    pd.testing.assert_frame_equal(
        frame.drop(columns="model_version"), expected.drop(columns="model_version")
    )
