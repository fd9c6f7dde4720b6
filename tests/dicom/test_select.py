"""Picking the frontal chest instance of a PACS study by the input gate's DICOM rules."""

from __future__ import annotations

import pydicom
import pytest

from cxr_errors import ImageError, NotARadiographError
from subscriptions.dicomweb import pick_frontal, study_uid


def _ds(
    sop: str, view: str = "PA", modality: str = "CR", rows: int = 1024, **kw: str
) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = f"1.2.3.{sop}"
    ds.SOPInstanceUID = f"1.2.3.{sop}.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = modality
    ds.BodyPartExamined = kw.get("body", "CHEST")
    ds.ViewPosition = view
    ds.Rows = rows
    ds.Columns = rows
    return ds


def test_pa_is_preferred_to_ap_and_to_an_unstated_view() -> None:
    chosen = pick_frontal([_ds("1", "AP"), _ds("2", ""), _ds("3", "PA")], "study")
    assert chosen.sop_uid == "1.2.3.3.1"


def test_the_larger_matrix_wins_between_two_of_the_same_view() -> None:
    chosen = pick_frontal([_ds("1", "AP", rows=512), _ds("2", "AP", rows=2048)], "study")
    assert chosen.sop_uid == "1.2.3.2.1"


def test_a_lateral_is_skipped_when_a_frontal_is_there() -> None:
    chosen = pick_frontal([_ds("1", "LL"), _ds("2", "AP")], "study")
    assert chosen.sop_uid == "1.2.3.2.1"


def test_only_a_lateral_is_refused_as_lateral() -> None:
    with pytest.raises(NotARadiographError, match="lateral view"):
        pick_frontal([_ds("1", "LL"), _ds("2", "RL")], "ImagingStudy/9")


def test_a_ct_study_is_refused_with_its_modality() -> None:
    with pytest.raises(NotARadiographError, match="Modality CT"):
        pick_frontal([_ds("1", "", modality="CT")], "study")


def test_a_study_of_only_non_images_is_refused() -> None:
    sr = pydicom.Dataset()
    sr.Modality = "SR"
    with pytest.raises(ImageError, match="no image instance"):
        pick_frontal([sr], "study")


def test_study_uid_reads_the_dicom_identifier() -> None:
    study = {"identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.1"}]}
    assert study_uid(study) == "1.2.840.1"
    assert study_uid({"identifier": [{"system": "x", "value": "y"}]}) is None


def test_a_header_field_with_an_invalid_value_is_left_out_not_fatal() -> None:
    from fhir_service.dicom.web import _dataset

    item = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00101010": {"vr": "AS", "Value": [62]},
        "00080060": {"vr": "CS", "Value": ["CR"]},
    }
    ds = _dataset(item)
    assert ds.StudyInstanceUID == "1.2.3"
    assert ds.Modality == "CR"
