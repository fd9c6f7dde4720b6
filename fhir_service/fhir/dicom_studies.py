"""FHIR for a study held in a PACS: Patient, ServiceRequest (by accession number), the PACS
Endpoint and the ImagingStudy, from the instances' DICOM headers, as one transaction.

Idempotent by Study Instance UID: the ImagingStudy is a conditional update on its
``urn:dicom:uid`` identifier (a new one is created, an existing one is brought up to date with
what the PACS holds, and an unchanged one is left at its version: HAPI skips no-op updates),
the others are conditional creates on their identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fhir_service.fhir.datatypes import conditional_create, identifier_condition, ref, urn
from fhir_service.fhir.derived import DCM, RFC3986, pacs_endpoint_entry
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology

__all__ = ["dicom_study_bundle"]

_GENDER = {"M": "male", "F": "female", "O": "other"}
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _s(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _patient(ds: Any, t: Terminology) -> Resource:
    system = t.identifier_system("pacs_patient_id")
    patient_id = _s(ds, "PatientID") or f"unknown-{_s(ds, 'StudyInstanceUID')}"
    resource: Resource = {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": patient_id}],
    }
    gender = _GENDER.get(_s(ds, "PatientSex").upper())
    if gender:
        resource["gender"] = gender
    return conditional_create(
        urn(patient_id, "patient"), resource, identifier_condition(system, patient_id)
    )


def _service_request(ds: Any, patient_url: str, t: Terminology) -> Resource | None:
    accession = _s(ds, "AccessionNumber")
    if not accession:
        return None
    system = t.identifier_system("accession")
    resource: Resource = {
        "resourceType": "ServiceRequest",
        "identifier": [
            {
                "type": {"coding": [{"system": _V2_0203, "code": "ACSN"}]},
                "system": system,
                "value": accession,
            }
        ],
        "status": "active",
        "intent": "order",
        "code": {"text": _s(ds, "StudyDescription") or "XR chest"},
        "subject": ref(patient_url),
    }
    return conditional_create(
        urn(accession, "service-request"), resource, identifier_condition(system, accession)
    )


def _series(instances: Sequence[Any], endpoint_url: str, t: Terminology) -> list[Resource]:
    by_uid: dict[str, Resource] = {}
    for ds in sorted(
        instances, key=lambda d: (_s(d, "SeriesInstanceUID"), _s(d, "SOPInstanceUID"))
    ):
        uid = _s(ds, "SeriesInstanceUID")
        series = by_uid.get(uid)
        if series is None:
            series = {"uid": uid, "modality": {"system": DCM, "code": _s(ds, "Modality") or "OT"}}
            if _s(ds, "SeriesNumber").isdigit():
                series["number"] = int(_s(ds, "SeriesNumber"))
            if _s(ds, "SeriesDescription"):
                series["description"] = _s(ds, "SeriesDescription")
            if _s(ds, "BodyPartExamined").upper() == "CHEST":
                series["bodySite"] = t.concept("body_site_thorax")
            series["endpoint"] = [ref(endpoint_url)]
            series["instance"] = []
            by_uid[uid] = series
        instance: Resource = {
            "uid": _s(ds, "SOPInstanceUID"),
            "sopClass": {"system": RFC3986, "code": f"urn:oid:{_s(ds, 'SOPClassUID')}"},
        }
        if _s(ds, "InstanceNumber").isdigit():
            instance["number"] = int(_s(ds, "InstanceNumber"))
        series["instance"].append(instance)
    for series in by_uid.values():
        series["numberOfInstances"] = len(series["instance"])
    return list(by_uid.values())


def dicom_study_bundle(
    instances: Sequence[Any], pacs_base_url: str, *, terminology: Terminology = TERMINOLOGY
) -> Resource:
    """The transaction registering one PACS study (``instances``: its pydicom headers, one
    study) as ``available``, its series and instances pointing at the PACS Endpoint."""
    t = terminology
    first = instances[0]
    study_uid = _s(first, "StudyInstanceUID")
    patient = _patient(first, t)
    endpoint = pacs_endpoint_entry(pacs_base_url, terminology=t)
    request = _service_request(first, patient["fullUrl"], t)
    series = _series(instances, endpoint["fullUrl"], t)
    dicom_uid = t.identifier_system("dicom_uid")
    study: Resource = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": dicom_uid, "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "modality": sorted(
            {s["modality"]["code"]: s["modality"] for s in series}.values(), key=lambda c: c["code"]
        ),
        "subject": ref(patient["fullUrl"]),
        "endpoint": [ref(endpoint["fullUrl"])],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(s["numberOfInstances"] for s in series),
        "series": series,
    }
    if request is not None:
        study["basedOn"] = [ref(request["fullUrl"])]
    if _s(first, "StudyDescription"):
        study["description"] = _s(first, "StudyDescription")
    date = _s(first, "StudyDate")
    if len(date) == 8 and date.isdigit():
        study["started"] = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    condition = identifier_condition(dicom_uid, f"urn:oid:{study_uid}")
    study_entry = {
        "fullUrl": urn(study_uid, "imaging-study"),
        "resource": study,
        "request": {"method": "PUT", "url": f"ImagingStudy?{condition}"},
    }
    entries = [patient, endpoint, *([request] if request else []), study_entry]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
