"""The result transaction (and its identifiers), built from synthetic numbers."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl

import pytest

from fhir_service.fhir.identifiers import (
    report_identifier,
    study_model_identifier,
    token_search_value,
)
from fhir_service.fhir.model_card import ModelEvaluation
from fhir_service.fhir.results import UNTRAINED_NOTE, build_result_transaction, is_cxr_overlay
from fhir_service.fhir.tasks import build_failed_task
from fhir_service.fhir.terminology import TERMINOLOGY
from models.types import NIH_FINDINGS, ImageAnalysis
from tests.factories import (
    IMAGE_SHA256,
    RECORDED,
    make_analysis,
    make_heatmaps,
    make_png,
    make_study,
    one_of,
    references,
    resources_of,
    result_bundle,
)
from tests.fhir.r4 import AIAST, R4_ELEMENTS, UCUM, Resource

# --- structure ------------------------------------------------------------------------------


def test_bundle_holds_one_of_each_and_14_observations(analysis: ImageAnalysis) -> None:
    bundle = result_bundle(analysis)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    kinds = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    positives = [f.finding for f in analysis.findings if f.positive]
    assert positives == ["Effusion", "Pneumothorax"]
    assert kinds == {
        "Device": 1,
        "DocumentReference": 1,
        "DiagnosticReport": 1,
        "Observation": 14,
        "Media": 2,
        "Provenance": 1,
    }
    titles = [m["content"]["title"] for m in resources_of(bundle, "Media")]
    assert ["Pleural effusion" in titles[0], "Pneumothorax" in titles[1]] == [True, True]


def test_only_r4_elements_and_valid_json(analysis: ImageAnalysis) -> None:
    bundle = result_bundle(analysis)
    json.dumps(bundle, allow_nan=False)
    for entry in bundle["entry"]:
        res = entry["resource"]
        assert set(res) <= R4_ELEMENTS[res["resourceType"]], res["resourceType"]


def test_every_reference_resolves(analysis: ImageAnalysis) -> None:
    bundle = result_bundle(analysis)
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for url in full_urls:
        assert url.startswith("urn:uuid:")
        uuid.UUID(url.removeprefix("urn:uuid:"))
    external = {"ImagingStudy/cxr-1", "ImagingStudy/cxr-1/_history/3", "Patient/p1"}
    for ref in references(bundle):
        assert ref in full_urls or ref in external, ref


def test_references_point_where_the_profile_says(analysis: ImageAnalysis) -> None:
    bundle = result_bundle(analysis)
    url_of = {id(e["resource"]): e["fullUrl"] for e in bundle["entry"]}
    device_url = url_of[id(one_of(bundle, "Device"))]
    report = one_of(bundle, "DiagnosticReport")
    observations = resources_of(bundle, "Observation")
    media = resources_of(bundle, "Media")

    assert [r["reference"] for r in report["result"]] == [url_of[id(o)] for o in observations]
    assert [m["link"]["reference"] for m in report["media"]] == [url_of[id(m)] for m in media]
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/cxr-1"}]
    assert report["subject"] == {"reference": "Patient/p1"}
    for obs in observations:
        assert obs["device"] == {"reference": device_url}
        assert obs["derivedFrom"] == [{"reference": "ImagingStudy/cxr-1"}]
        assert obs["subject"] == {"reference": "Patient/p1"}
    for m in media:
        assert m["device"] == {"reference": device_url}
        assert m["partOf"] == [{"reference": "ImagingStudy/cxr-1"}]
    # R4 does not allow a Device as performer of these: attribution is device + Provenance.
    assert all("performer" not in r for r in [report, *observations])

    prov = one_of(bundle, "Provenance")
    targets = [t["reference"] for t in prov["target"]]
    assert targets == [url_of[id(report)], *(url_of[id(o)] for o in observations)] + [
        url_of[id(m)] for m in media
    ]
    assert prov["agent"] == [
        {
            "type": {"coding": [TERMINOLOGY.concept("provenance_agent_author")]},
            "who": {"reference": device_url},
        }
    ]
    card = one_of(bundle, "DocumentReference")
    assert card["subject"] == {"reference": device_url}
    assert prov["entity"] == [
        {"role": "source", "what": {"reference": "ImagingStudy/cxr-1/_history/3"}},
        {"role": "source", "what": {"reference": url_of[id(card)], "display": "model card"}},
    ]
    assert prov["reason"] == [{"coding": [AIAST]}]
    assert prov["activity"]["coding"][0]["code"] == "CREATE"
    assert prov["recorded"] == "2025-01-02T03:04:05.000+00:00"


def test_every_entry_is_a_conditional_create_on_its_own_identifier(
    analysis: ImageAnalysis,
) -> None:
    bundle = result_bundle(analysis)
    for entry in bundle["entry"]:
        res, req = entry["resource"], entry["request"]
        assert req["method"] == "POST" and req["url"] == res["resourceType"]
        params = parse_qsl(req["ifNoneExist"])
        if res["resourceType"] == "Provenance":
            report_url = next(
                e["fullUrl"]
                for e in bundle["entry"]
                if e["resource"]["resourceType"] == "DiagnosticReport"
            )
            assert req["ifNoneExist"] == f"target={report_url}"
            continue
        ((name, token),) = params
        assert name == "identifier"
        first = res["identifier"][0]
        assert token == f"{first['system']}|{first['value']}"


def test_report_identifier_is_the_idempotency_key(analysis: ImageAnalysis) -> None:
    bundle = result_bundle(analysis)
    report = one_of(bundle, "DiagnosticReport")
    key = report_identifier("cxr-1", analysis.model_version, IMAGE_SHA256)
    assert report["identifier"][0] == {"system": key[0], "value": key[1]}
    sm = study_model_identifier("cxr-1", analysis.model_version)
    assert report["identifier"][1] == {"system": sm[0], "value": sm[1]}
    # Observations and Media are keyed on the report key plus the finding.
    obs_values = [o["identifier"][0]["value"] for o in resources_of(bundle, "Observation")]
    assert obs_values[7] == f"{key[1]}.pneumothorax"
    assert len(set(obs_values)) == 14


def test_report_identifier_depends_on_all_three_parts() -> None:
    base = report_identifier("s", "m", "0" * 64)
    assert base == report_identifier("s", "m", "0" * 64)
    others = {
        report_identifier("s2", "m", "0" * 64),
        report_identifier("s", "m2", "0" * 64),
        report_identifier("s", "m", "1" * 64),
    }
    assert base not in others and len(others) == 3
    with pytest.raises(ValueError, match="64 lowercase hex"):
        report_identifier("s", "m", "ABC")
    revisions = {report_identifier("s", "m", "0" * 64, revision=r) for r in range(1, 4)}
    assert report_identifier("s", "m", "0" * 64, revision=0) == base
    assert len(revisions) == 3 and base not in revisions and not revisions & others
    with pytest.raises(ValueError, match="revision"):
        report_identifier("s", "m", "0" * 64, revision=-1)


# --- content --------------------------------------------------------------------------------


def test_report_content(analysis: ImageAnalysis) -> None:
    report = one_of(result_bundle(analysis), "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["meta"] == {"security": [AIAST]}
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "36554-4",
        "display": "XR Chest Single view",
    }
    assert report["issued"] == "2025-01-02T03:04:05.000+00:00"
    assert report["effectiveDateTime"] == "2024-12-31T22:15:00+00:00"
    conclusion = report["conclusion"]
    assert "untrained" not in conclusion.lower()
    first, second, third = (
        "Pneumothorax calibrated probability 0.900 (95 % band 0.820–0.960, above threshold 0.5)",
        "Pleural effusion calibrated probability 0.620",
        "Atelectasis calibrated probability 0.310",
    )
    assert conclusion.index(first) < conclusion.index(second) < conclusion.index(third)
    assert "Cardiomegaly" not in conclusion  # top 3 only, all positives included
    codes = [cc["coding"][0]["code"] for cc in report["conclusionCode"]]
    assert codes == ["60046008", "36118008"]


def test_observation_content(analysis: ImageAnalysis) -> None:
    observations = resources_of(result_bundle(analysis), "Observation")
    assert [o["code"]["coding"][-1]["code"] for o in observations] == list(NIH_FINDINGS)
    for obs, score in zip(observations, analysis.findings, strict=True):
        assert obs["status"] == "preliminary"
        assert obs["meta"] == {"security": [AIAST]}
        assert obs["category"][0]["coding"][0]["code"] == "imaging"
        assert obs["bodySite"]["coding"][0]["code"] == "39607008"
        value = obs["valueQuantity"]
        assert value == {
            "value": round(score.calibrated_probability, 4),
            "system": UCUM,
            "code": "1",
        }
        assert 0.0 <= value["value"] <= 1.0
        (confidence,) = [e for e in obs["extension"] if "valueRange" in e]
        assert confidence["url"] == (
            "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence"
        )
        band = confidence["valueRange"]
        assert band["low"]["value"] <= value["value"] <= band["high"]["value"]
        assert band["low"]["system"] == band["high"]["system"] == UCUM
        interp = obs["interpretation"][0]["coding"][0]["code"]
        assert interp == ("POS" if score.positive else "NEG")
        components = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in obs["component"]}
        assert components["logit"]["value"] == round(score.logit, 4)
        assert components["sigmoid-score"]["value"] == round(score.sigmoid_score, 4)
        assert components["operating-threshold"]["value"] == score.threshold
        assert "note" not in obs


def test_probability_at_the_threshold_is_positive() -> None:
    analysis = make_analysis({"Mass": 0.5})
    obs = resources_of(result_bundle(analysis), "Observation")[NIH_FINDINGS.index("Mass")]
    assert obs["interpretation"][0]["coding"][0]["code"] == "POS"


def test_media_content(analysis: ImageAnalysis) -> None:
    heatmaps = make_heatmaps(analysis)
    bundle = result_bundle(analysis)
    for media in resources_of(bundle, "Media"):
        assert media["status"] == "completed"
        assert media["meta"] == {"security": [AIAST]}
        content = media["content"]
        assert content["contentType"] == "image/png"
        label = next(lbl for lbl in heatmaps if TERMINOLOGY.findings[lbl].text in content["title"])
        assert base64.b64decode(content["data"]) == heatmaps[label]
        assert (media["width"], media["height"]) == (8, 8)
        assert media["reasonCode"][0]["coding"][-1]["code"] == label
        assert is_cxr_overlay(media)
    assert not is_cxr_overlay({"resourceType": "Media", "partOf": [{"reference": "x"}]})


def test_device_content(analysis: ImageAnalysis) -> None:
    device = one_of(result_bundle(analysis), "Device")
    assert device["identifier"] == [
        {
            "system": TERMINOLOGY.identifier_system("device"),
            "value": "densenet121-res224-nih+sha256:0123abcd",
        }
    ]
    assert device["version"] == [{"value": "densenet121-res224-nih+sha256:0123abcd"}]
    assert device["type"]["coding"][0]["code"] == "Artificial-Intelligence"
    assert {n["type"] for n in device["deviceName"]} == {"user-friendly-name", "model-name"}
    assert "note" not in device


def test_no_positive_finding_means_no_media() -> None:
    bundle = result_bundle(make_analysis({}))
    assert resources_of(bundle, "Media") == []
    report = one_of(bundle, "DiagnosticReport")
    assert "media" not in report and "conclusionCode" not in report
    assert "No finding at or above its operating threshold." in report["conclusion"]


# --- untrained ------------------------------------------------------------------------------


def test_untrained_is_said_everywhere_it_can_be_read(untrained_analysis: ImageAnalysis) -> None:
    bundle = result_bundle(untrained_analysis)
    device = one_of(bundle, "Device")
    assert "untrained" in device["version"][0]["value"]
    assert "UNTRAINED" in device["note"][0]["text"]
    report = one_of(bundle, "DiagnosticReport")
    assert report["conclusion"].startswith("UNTRAINED MODEL — NOT A FINDING")
    for obs in resources_of(bundle, "Observation"):
        assert obs["note"] == [{"text": UNTRAINED_NOTE}]
        assert obs["note"][0]["text"].lower().startswith("untrained model output — not a finding")
    media = resources_of(bundle, "Media")
    assert media
    for m in media:
        assert "UNTRAINED" in m["content"]["title"]
        assert "not a finding" in m["note"][0]["text"]
    for link in report["media"]:
        assert "UNTRAINED" in link["comment"]


def test_untrained_flag_alone_still_marks_the_device_version() -> None:
    analysis = make_analysis(untrained=True, model_version="densenet121-res224-nih+sha256:00")
    device = one_of(result_bundle(analysis), "Device")
    assert device["version"][0]["value"] == "densenet121-res224-nih+sha256:00 (untrained)"
    # ... and is a different Device from the trained run of the same weights name.
    assert device["identifier"][0]["value"] == device["version"][0]["value"]


def test_untrained_in_the_version_alone_is_treated_as_untrained() -> None:
    analysis = make_analysis(untrained=False, model_version="densenet121+untrained")
    report = one_of(result_bundle(analysis), "DiagnosticReport")
    assert report["conclusion"].startswith("UNTRAINED MODEL")


def test_trained_output_never_mentions_untrained(analysis: ImageAnalysis) -> None:
    assert "untrained" not in json.dumps(result_bundle(analysis)).lower()


# --- determinism ----------------------------------------------------------------------------


def test_same_inputs_give_byte_identical_bundles(analysis: ImageAnalysis) -> None:
    first = json.dumps(result_bundle(analysis), sort_keys=True)
    again = json.dumps(result_bundle(make_analysis()), sort_keys=True)
    assert first == again


def test_only_timestamps_change_with_the_time(analysis: ImageAnalysis) -> None:
    later = RECORDED + timedelta(hours=5)
    a = json.dumps(result_bundle(analysis))
    b = json.dumps(result_bundle(analysis, recorded=later))
    assert a != b
    assert a.replace("2025-01-02T03:04:05.000+00:00", "T") == b.replace(
        "2025-01-02T08:04:05.000+00:00", "T"
    )


def test_other_pixels_give_other_keys_and_placeholders(analysis: ImageAnalysis) -> None:
    a = result_bundle(analysis)
    b = result_bundle(analysis, image_sha256="cd" * 32)
    urls_a = {e["fullUrl"] for e in a["entry"]}
    urls_b = {e["fullUrl"] for e in b["entry"]}
    # The Device and its model card are the same model's: same placeholders; the rest is new.
    assert urls_a & urls_b == {a["entry"][0]["fullUrl"], a["entry"][1]["fullUrl"]}


# --- input checks ---------------------------------------------------------------------------


def test_missing_heatmap_for_a_positive_is_an_error(analysis: ImageAnalysis) -> None:
    with pytest.raises(ValueError, match="Pneumothorax"):
        build_result_transaction(
            make_study(),
            analysis,
            {"Effusion": make_png()},
            image_sha256=IMAGE_SHA256,
            recorded=RECORDED,
        )


def test_heatmap_must_be_png(analysis: ImageAnalysis) -> None:
    heatmaps = {**make_heatmaps(analysis), "Effusion": b"GIF89a not a png at all"}
    with pytest.raises(ValueError, match="PNG"):
        build_result_transaction(
            make_study(), analysis, heatmaps, image_sha256=IMAGE_SHA256, recorded=RECORDED
        )


def test_naive_timestamp_is_refused(analysis: ImageAnalysis) -> None:
    with pytest.raises(ValueError, match="timezone"):
        result_bundle(analysis, recorded=datetime(2025, 1, 1))


def test_other_timezones_are_kept(analysis: ImageAnalysis) -> None:
    cet = RECORDED.astimezone(timezone(timedelta(hours=1)))
    report = one_of(result_bundle(analysis, recorded=cet), "DiagnosticReport")
    assert report["issued"] == "2025-01-02T04:04:05.000+01:00"


def test_out_of_range_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        result_bundle(make_analysis({"Mass": 1.5}))
    nan = make_analysis()
    broken = nan.findings[0].__class__(**{**nan.findings[0].__dict__, "logit": float("nan")})
    bad = ImageAnalysis(
        findings=(broken, *nan.findings[1:]),
        cams=nan.cams,
        cam_bias=nan.cam_bias,
        features=nan.features,
        model_version=nan.model_version,
        untrained=False,
    )
    with pytest.raises(ValueError, match="finite"):
        result_bundle(bad)


def test_study_without_subject_is_refused(analysis: ImageAnalysis) -> None:
    study = make_study()
    del study["subject"]
    with pytest.raises(ValueError, match="subject"):
        result_bundle(analysis, study=study)


def test_unversioned_study_gives_unversioned_source(analysis: ImageAnalysis) -> None:
    study = make_study()
    del study["meta"]
    prov = one_of(result_bundle(analysis, study=study), "Provenance")
    assert prov["entity"][0]["what"] == {"reference": "ImagingStudy/cxr-1"}


def test_token_search_value_escapes_and_encodes() -> None:
    value = r"w+e|i,r$d\v 1"
    token = token_search_value("https://x.example/s", value)
    ((_, decoded),) = parse_qsl("identifier=" + token)
    assert decoded == r"https://x.example/s|w+e\|i\,r\$d\\v 1"


_CALIBRATED_WORD = re.compile(r"(?<!un)calibrated", re.IGNORECASE)


def test_without_calibration_nothing_says_calibrated_and_no_range() -> None:
    analysis = make_analysis(calibrated=False, band_kind="none")
    bundle = result_bundle(analysis)
    text = json.dumps(bundle)
    assert _CALIBRATED_WORD.search(text) is None, _CALIBRATED_WORD.findall(text)
    for obs in resources_of(bundle, "Observation"):
        assert "valueRange" not in json.dumps(obs)  # no band was computed: no Range
        interpretation = obs["interpretation"][0]["text"]
        assert interpretation.startswith("uncalibrated score ")
        assert any("not a probability" in n["text"] for n in obs["note"])
    conclusion = one_of(bundle, "DiagnosticReport")["conclusion"]
    assert "Pneumothorax uncalibrated score 0.900 (above threshold 0.5)" in conclusion
    assert "band" not in conclusion


def test_tta_band_is_named_a_spread_not_a_confidence_interval() -> None:
    bundle = result_bundle(make_analysis(calibrated=False, band_kind="tta-spread"))
    for obs in resources_of(bundle, "Observation"):
        (ext,) = [e for e in obs["extension"] if "valueRange" in e]
        assert ext["url"].endswith("/StructureDefinition/tta-spread")
        assert "AIconfidence" not in json.dumps(obs)
    conclusion = one_of(bundle, "DiagnosticReport")["conclusion"]
    assert "spread over augmented views 0.820–0.960" in conclusion


def test_small_thresholds_keep_their_digits() -> None:
    bundle = result_bundle(make_analysis(threshold=0.00045666535, calibrated=False))
    obs = resources_of(bundle, "Observation")[0]
    assert obs["interpretation"][0]["text"].endswith("operating threshold 0.0004567")


def test_weights_sha256_on_device_and_provenance() -> None:
    analysis = dataclasses.replace(make_analysis(), weights_sha256="cd" * 32)
    bundle = result_bundle(analysis)
    device = one_of(bundle, "Device")
    assert {"type": {"text": "sha256 of the loaded weights file"}, "value": "cd" * 32} in device[
        "version"
    ]
    provenance = one_of(bundle, "Provenance")
    weights = [e["what"] for e in provenance["entity"] if "identifier" in e["what"]]
    assert weights == [
        {
            "identifier": {
                "system": "https://cxr-fhir.example.org/fhir/NamingSystem/model-weights-sha256",
                "value": "cd" * 32,
            },
            "display": "sha256 of the loaded weights file",
        }
    ]


def test_observations_and_report_are_based_on_the_studys_service_request() -> None:
    from tests.factories import make_study, one_of, resources_of, result_bundle

    study = {**make_study(), "basedOn": [{"reference": "ServiceRequest/sr1"}]}
    bundle = result_bundle(study=study)
    assert one_of(bundle, "DiagnosticReport")["basedOn"] == [{"reference": "ServiceRequest/sr1"}]
    for obs in resources_of(bundle, "Observation"):
        assert obs["basedOn"] == [{"reference": "ServiceRequest/sr1"}]
    assert "basedOn" not in one_of(result_bundle(), "DiagnosticReport")


def _score(obs: Resource) -> dict[str, Any]:
    (ext,) = [e for e in obs["extension"] if e["url"] == TERMINOLOGY.extension_url("ai_score")]
    return {
        part["url"]: next(v for k, v in part.items() if k.startswith("value"))
        for part in ext["extension"]
    }


def test_each_observation_carries_its_score_in_one_structured_extension() -> None:
    analysis = make_analysis(calibrated=True, band_kind="calibration", threshold=0.00045666535)
    for obs, f in zip(
        resources_of(result_bundle(analysis), "Observation"), analysis.findings, strict=True
    ):
        score = _score(obs)
        assert score["score"] == obs["valueQuantity"]["value"]
        assert score["scoreKind"] == "calibrated-probability"
        assert score["threshold"] == 0.000457
        assert score["atOrAboveThreshold"] is f.positive
        assert score["band"]["low"]["value"] == round(f.band_low, 4)
        assert score["bandKind"] == "calibration"
        assert "untrained" not in score
    raw = make_analysis(calibrated=False, band_kind="none")
    score = _score(resources_of(result_bundle(raw), "Observation")[0])
    assert score["scoreKind"] == "uncalibrated-score"
    assert "band" not in score and "bandKind" not in score


def test_untrained_is_in_the_score_extension(untrained_analysis: ImageAnalysis) -> None:
    for obs in resources_of(result_bundle(untrained_analysis), "Observation"):
        assert _score(obs)["untrained"] is True


def test_observations_identify_the_image_they_were_read_from() -> None:
    from fhir_service.fhir.observation_links import SourceImage

    media = result_bundle(source=SourceImage(media="Media/m1"))
    for obs in resources_of(media, "Observation"):
        assert obs["derivedFrom"][1:] == [{"reference": "Media/m1"}]
        assert "source-instance" not in json.dumps(obs)
    dicom = result_bundle(source=SourceImage(sop_instance_uid="1.2.3.4"))
    for obs in resources_of(dicom, "Observation"):
        (ext,) = [e for e in obs["extension"] if e["url"].endswith("/source-instance")]
        assert ext["valueIdentifier"] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}
        assert len(obs["derivedFrom"]) == 1  # the ImagingStudy


# --- the model card -------------------------------------------------------------------------


def _card(bundle: Resource) -> tuple[Resource, str]:
    card = one_of(bundle, "DocumentReference")
    return card, base64.b64decode(card["content"][0]["attachment"]["data"]).decode()


def _evaluation(sha: str | None) -> ModelEvaluation:
    return ModelEvaluation.from_json(
        {
            "source": "nih-sample",
            "images": 58,
            "weights_sha256": sha,
            "findings": [
                {"finding": "Effusion", "n": 58, "positives": 9, "auroc": 0.8123,
                 "auroc_ci95": [0.7, 0.9]},
            ],
        }
    )  # fmt: skip


def test_model_card_says_what_the_model_is_for_and_is_not() -> None:
    analysis = dataclasses.replace(make_analysis(), weights_sha256="cd" * 32)
    card, text = _card(result_bundle(analysis))
    assert card["status"] == "current"
    assert card["content"][0]["attachment"]["contentType"].startswith("text/markdown")
    for section in ("## Intended use", "## Training data", "## Evaluation", "## Limitations"):
        assert section in text
    assert "cd" * 32 in text
    assert "No evaluation on record for these weights" in text
    assert "untrained" not in text.lower()


def test_untrained_model_card_says_so_first(untrained_analysis: ImageAnalysis) -> None:
    card, text = _card(result_bundle(untrained_analysis))
    assert "UNTRAINED, NOT FOR CLINICAL USE" in card["description"]
    assert text.splitlines()[2].startswith("**UNTRAINED — NOT FOR CLINICAL USE.**")
    assert "randomly initialised" in text


def test_model_card_shows_an_evaluation_of_these_weights_only() -> None:
    analysis = dataclasses.replace(make_analysis(), weights_sha256="cd" * 32)
    plain, _ = _card(result_bundle(analysis))
    shown, text = _card(result_bundle(analysis, evaluation=_evaluation("cd" * 32)))
    assert "| Effusion | 58 | 9 | 0.812 [0.700, 0.900] |" in text
    assert shown["identifier"] != plain["identifier"]  # a new evaluation is a new card
    _, other = _card(result_bundle(analysis, evaluation=_evaluation("ef" * 32)))
    assert "not of these weights" in other and "| Effusion" not in other
    with pytest.raises(ValueError, match="cxr evaluate"):
        ModelEvaluation.from_json({"findings": [{}]})


# --- the study's open Task ------------------------------------------------------------------


def test_an_open_task_is_completed_in_the_reports_own_transaction() -> None:
    study = make_study()
    failed = build_failed_task(
        study, "no Media with pixels for this study", "no-pixels", now=RECORDED
    )
    failed = {**failed, "id": "t9", "meta": {"versionId": "4"}}
    bundle = result_bundle(study=study, open_task=failed)
    (entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Task"]
    assert entry["request"] == {"method": "PUT", "url": "Task/t9", "ifMatch": 'W/"4"'}
    task = entry["resource"]
    assert task["id"] == "t9" and task["status"] == "completed" and "meta" not in task
    report_url = next(
        e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert [o["valueReference"]["reference"] for o in task["output"]] == [report_url]
    assert "no Media with pixels" in task["statusReason"]["text"]
    assert task["lastModified"] == "2025-01-02T03:04:05.000+00:00"
    assert not resources_of(result_bundle(study=study), "Task")
