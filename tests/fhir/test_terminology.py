"""codes.json is the one place a terminology review edits: its content is pinned here.

A failing test here after a review is expected: update the pin in the same change, so that
every code change is a visible, reviewed diff.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from fhir_service.fhir.terminology import (
    TERMINOLOGY,
    finding_code,
    load_terminology,
    local_code_systems,
)
from models.types import NIH_FINDINGS

SCT = "http://snomed.info/sct"
RADLEX = "http://radlex.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"

#: label -> (standard codes in order, as "system|code"), straight from FHIR_PROFILE.md.
EXPECTED_FINDINGS = {
    "Atelectasis": (f"{SCT}|46621007", f"{RADLEX}|RID28493"),
    "Cardiomegaly": (f"{SCT}|8186001",),
    "Effusion": (f"{SCT}|60046008", f"{RADLEX}|RID34539"),
    "Infiltration": (f"{DCM}|112121",),
    "Mass": (f"{SCT}|4147007", f"{RADLEX}|RID39056"),
    "Nodule": (f"{SCT}|27925004", f"{RADLEX}|RID50149"),
    "Pneumonia": (f"{SCT}|233604007", f"{RADLEX}|RID5350"),
    "Pneumothorax": (f"{SCT}|36118008", f"{RADLEX}|RID5352"),
    "Consolidation": (f"{SCT}|95436008", f"{RADLEX}|RID43255"),
    "Edema": (f"{SCT}|19242006", f"{RADLEX}|RID4866"),
    "Emphysema": (f"{SCT}|87433001", f"{RADLEX}|RID4799"),
    "Fibrosis": (f"{SCT}|51615001",),
    "Pleural_Thickening": (f"{SCT}|78381009",),
    "Hernia": (f"{SCT}|84089009",),
}

#: The codes the profile marks "verify": they must stay marked until the review signs off.
EXPECTED_VERIFY = {
    "Cardiomegaly": f"{SCT}|8186001",
    "Consolidation": f"{SCT}|95436008",
    "Pleural_Thickening": f"{SCT}|78381009",
}

EXPECTED_CONCEPTS = {
    "report_code": "http://loinc.org|36554-4",
    "report_category": "http://terminology.hl7.org/CodeSystem/v2-0074|RAD",
    "observation_category": "http://terminology.hl7.org/CodeSystem/observation-category|imaging",
    "ai_asserted": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue|AIAST",
    "ai_device_type": (
        "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS|Artificial-Intelligence"
    ),
    "body_site_lung": f"{SCT}|39607008",
    "interpretation_positive": (
        "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation|POS"
    ),
    "interpretation_negative": (
        "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation|NEG"
    ),
    "interpretation_indeterminate": (
        "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation|IND"
    ),
    "provenance_activity_create": "http://terminology.hl7.org/CodeSystem/v3-DataOperation|CREATE",
    "provenance_activity_update": "http://terminology.hl7.org/CodeSystem/v3-DataOperation|UPDATE",
    "provenance_agent_verifier": (
        "http://terminology.hl7.org/CodeSystem/provenance-participant-type|verifier"
    ),
    "provenance_agent_author": (
        "http://terminology.hl7.org/CodeSystem/provenance-participant-type|author"
    ),
    "media_type_image": "http://terminology.hl7.org/CodeSystem/media-type|image",
    "unit_one": "http://unitsofmeasure.org|1",
}


def _raw() -> dict[str, object]:
    text = resources.files("fhir_service.fhir").joinpath("codes.json").read_text("utf-8")
    data = json.loads(text)
    assert isinstance(data, dict)
    return data


def test_findings_cover_nih_labels_in_order() -> None:
    assert tuple(TERMINOLOGY.findings) == NIH_FINDINGS


@pytest.mark.parametrize("label", NIH_FINDINGS)
def test_finding_codes_match_the_profile(label: str) -> None:
    fc = TERMINOLOGY.findings[label]
    assert tuple(f"{c['system']}|{c['code']}" for c in fc.codings) == EXPECTED_FINDINGS[label]
    assert fc.text
    assert all(c.get("display") for c in fc.codings if c["system"] != RADLEX)


def test_verify_marks_match_the_profile() -> None:
    marked = {
        label: tuple(item.split(": ", 1)[0] for item in fc.verify)
        for label, fc in TERMINOLOGY.findings.items()
        if fc.verify
    }
    assert marked == {label: (code,) for label, code in EXPECTED_VERIFY.items()}


def test_fixed_concepts() -> None:
    for name, expected in EXPECTED_CONCEPTS.items():
        coding = TERMINOLOGY.concept(name)
        assert f"{coding['system']}|{coding['code']}" == expected, name
        assert coding.get("display"), name


def test_uris() -> None:
    assert (
        TERMINOLOGY.extension_url("ai_confidence")
        == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence"
    )
    assert (
        TERMINOLOGY.code_system_url("nih_label")
        == "https://cxr-fhir.example.org/fhir/CodeSystem/nih-chestxray14"
    )
    raw = _raw()
    local = [*raw["identifier_systems"].values()]  # type: ignore[attr-defined]
    local += [cs["url"] for cs in raw["code_systems"].values()]  # type: ignore[attr-defined]
    local += [u for k, u in raw["extensions"].items() if k != "ai_confidence"]  # type: ignore[attr-defined]
    assert len(set(local)) == len(local), "every local URI must be distinct"
    assert all(u.startswith(raw["local_base"] + "/") for u in local)  # type: ignore[operator]


def test_shape_of_every_coding() -> None:
    """Only system, code, display (nullable), verify: anything else is a typo a review misses."""
    raw = _raw()
    for item in raw["findings"]:  # type: ignore[attr-defined]
        assert set(item) <= {"label", "text", "codings", "note"}
        for c in item["codings"]:
            assert set(c) <= {"system", "code", "display", "verify"}
            assert {"system", "code", "display"} <= set(c)
    for c in raw["concepts"].values():  # type: ignore[attr-defined]
        assert set(c) == {"system", "code", "display"}


def test_finding_code_adds_the_nih_label() -> None:
    cc = finding_code("Pleural_Thickening")
    assert cc["text"] == "Pleural thickening"
    assert cc["coding"][-1] == {
        "system": "https://cxr-fhir.example.org/fhir/CodeSystem/nih-chestxray14",
        "code": "Pleural_Thickening",
    }
    assert all("verify" not in c for c in cc["coding"])
    # RadLex displays are left out until the review confirms them.
    assert all("display" not in c for c in finding_code("Mass")["coding"] if c["system"] == RADLEX)


def test_load_rejects_a_file_that_drifts_from_the_model_labels() -> None:
    raw = _raw()
    raw["findings"] = raw["findings"][:-1]  # type: ignore[index]
    with pytest.raises(ValueError, match="NIH_FINDINGS"):
        load_terminology(json.dumps(raw))


def test_local_code_systems_list_every_local_code() -> None:
    systems = {cs["url"]: cs for cs in local_code_systems()}
    nih = systems[TERMINOLOGY.code_system_url("nih_label")]
    assert [c["code"] for c in nih["concept"]] == list(NIH_FINDINGS)
    assert nih["content"] == "complete" and nih["count"] == 14
    out = systems[TERMINOLOGY.code_system_url("model_output")]
    expected = {"logit", "sigmoid-score", "operating-threshold", "untrained", "not-saved"}
    assert {c["code"] for c in out["concept"]} == expected
