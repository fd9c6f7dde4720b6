"""FHIR for DICOM objects in a PACS: the PACS's ``Endpoint`` (connectionType dicom-wado-rs)
and the ImagingStudy that lists the objects we wrote back (the SR and heatmap Segmentation),
which the DiagnosticReport names beside the source study.

The derived ImagingStudy is identified by the report key (our ``derived_dicom`` system), not
by the Study Instance UID it shares with the source: a second ImagingStudy carrying that UID
would make the source's lookups by Study Instance UID ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhir_service.fhir.datatypes import conditional_create, identifier_condition, ref, urn
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology

__all__ = [
    "DerivedObject",
    "DerivedObjects",
    "derived_study_entry",
    "pacs_endpoint",
    "pacs_endpoint_entry",
]

ENDPOINT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RFC3986 = "urn:ietf:rfc:3986"


@dataclass(frozen=True)
class DerivedObject:
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    description: str


@dataclass(frozen=True)
class DerivedObjects:
    """What was stored in the PACS for one report."""

    study_uid: str
    source_sop_uid: str
    endpoint: str
    objects: tuple[DerivedObject, ...]


def pacs_endpoint(address: str, *, terminology: Terminology = TERMINOLOGY) -> Resource:
    """The Endpoint of a DICOMweb base (WADO-RS; the same base serves QIDO-RS and STOW-RS)."""
    return {
        "resourceType": "Endpoint",
        "identifier": [
            {"system": terminology.identifier_system("pacs_endpoint"), "value": address}
        ],
        "status": "active",
        "connectionType": {
            "system": ENDPOINT_TYPE_SYSTEM,
            "code": "dicom-wado-rs",
            "display": "DICOM WADO-RS",
        },
        "name": "PACS (DICOMweb)",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


def pacs_endpoint_entry(address: str, *, terminology: Terminology = TERMINOLOGY) -> Resource:
    """A conditional create of :func:`pacs_endpoint`, fullUrl ``urn:uuid`` from the address."""
    system = terminology.identifier_system("pacs_endpoint")
    return conditional_create(
        urn(address, "endpoint"),
        pacs_endpoint(address, terminology=terminology),
        identifier_condition(system, address),
    )


def derived_study_entry(
    derived: DerivedObjects,
    *,
    key: str,
    subject: str,
    source_study: str,
    endpoint_url: str,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The ImagingStudy listing the SR and Segmentation stored for report ``key``."""
    system = terminology.identifier_system("derived_dicom")
    series: dict[str, Resource] = {}
    for obj in derived.objects:
        s = series.setdefault(
            obj.series_uid,
            {
                "uid": obj.series_uid,
                "modality": {"system": DCM, "code": obj.modality},
                "description": obj.description or obj.modality,
                "instance": [],
            },
        )
        s["instance"].append(
            {
                "uid": obj.sop_uid,
                "sopClass": {"system": RFC3986, "code": f"urn:oid:{obj.sop_class_uid}"},
            }
        )
    for s in series.values():
        s["numberOfInstances"] = len(s["instance"])
        s["endpoint"] = [ref(endpoint_url)]
    study: Resource = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": system, "value": key}],
        "status": "available",
        "modality": [
            {"system": DCM, "code": m} for m in sorted({o.modality for o in derived.objects})
        ],
        "subject": ref(subject),
        "endpoint": [ref(endpoint_url)],
        "numberOfSeries": len(series),
        "numberOfInstances": len(derived.objects),
        "description": (
            f"AI results stored in the PACS for {source_study} (study {derived.study_uid}, "
            f"source instance {derived.source_sop_uid})"
        ),
        "series": list(series.values()),
    }
    return conditional_create(urn(key, "derived-study"), study, identifier_condition(system, key))
