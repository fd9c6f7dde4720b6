"""The results as DICOM: a TID 1500 Measurement Report (Comprehensive 3D SR, highdicom).

One measurement group (TID 1501) per finding, tracked by the finding's name: its score
(TID 300 measurement, unit ``{probability}`` when calibrated, ``1`` for an uncalibrated score),
its operating threshold, and a qualitative evaluation "Presence: present/absent" (SNOMED CT:
flagged or not), each naming the algorithm (TID 4019: name, version, the weights' sha256 as a
parameter); every group references the source instance (SourceImageForMeasurementGroup). The
document title is "Imaging Measurement Report"; an untrained model's report says so in the
algorithm name and the series description, and no report is ever ``is_final`` or verified.

Inputs are plain data (:class:`SrFinding`, :class:`Algorithm`) so this module knows no model.
UIDs are derived from a stable key, so writing the same report twice stores the same instance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes

__all__ = ["Algorithm", "SrFinding", "build_sr", "stable_uid"]

#: Our private coding scheme for concepts no standard terminology names (DICOM PS3.16 8.2:
#: coding scheme designators beginning "99" are private).
LOCAL_SCHEME = "99CXRFHIR"
SCORE = CodedConcept("score", LOCAL_SCHEME, "Model output score")
THRESHOLD = CodedConcept("threshold", LOCAL_SCHEME, "Operating threshold")
PRESENCE = CodedConcept("705057003", "SCT", "Presence")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("2667000", "SCT", "Absent")
CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = CodedConcept("{probability}", "UCUM", "probability")
UNITLESS = CodedConcept("1", "UCUM", "no units")


@dataclass(frozen=True)
class SrFinding:
    name: str
    """the finding's label, e.g. ``Effusion`` (its tracking identifier)"""
    code: str
    scheme: str
    """``SCT`` for SNOMED CT, or a private scheme"""
    display: str
    score: float
    threshold: float
    flagged: bool
    calibrated: bool


@dataclass(frozen=True)
class Algorithm:
    name: str
    version: str
    weights_sha256: str
    untrained: bool


def stable_uid(key: str) -> str:
    """A UID that is the same for the same key: ``2.25.`` and a 128-bit integer from the
    key's sha256 (PS3.5 B.2, a UUID-derived UID; pydicom's ``generate_uid(prefix=None)``
    ignores its entropy sources and is random)."""
    return "2.25." + str(int(hashlib.sha256(key.encode()).hexdigest()[:32], 16))


def _group(
    finding: SrFinding, source: pydicom.Dataset, algo: AlgorithmIdentification
) -> MeasurementsAndQualitativeEvaluations:
    unit = PROBABILITY if finding.calibrated else UNITLESS
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=stable_uid(f"{source.SOPInstanceUID}/{finding.name}"), identifier=finding.name
        ),
        finding_type=CodedConcept(finding.code, finding.scheme, finding.display),
        algorithm_id=algo,
        measurements=[
            Measurement(name=SCORE, value=round(finding.score, 6), unit=unit, algorithm_id=algo),
            Measurement(name=THRESHOLD, value=round(finding.threshold, 6), unit=unit),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(name=PRESENCE, value=PRESENT if finding.flagged else ABSENT)
        ],
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )


def build_sr(
    source: pydicom.Dataset,
    findings: Sequence[SrFinding],
    algorithm: Algorithm,
    *,
    key: str,
) -> pydicom.Dataset:
    """The TID 1500 report on ``source`` (a header is enough: patient, study, SOP UIDs)."""
    name = (
        f"{algorithm.name} (UNTRAINED - not for clinical use)"
        if algorithm.untrained
        else algorithm.name
    )
    algo = AlgorithmIdentification(
        name=name,
        version=algorithm.version,
        parameters=[f"weights-sha256={algorithm.weights_sha256}"],
    )
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=stable_uid(f"device/{algorithm.version}/{algorithm.weights_sha256}"),
            name=name[:64],
            manufacturer_name="cxr-fhir",
            model_name=algorithm.version[:64],
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=[_group(f, source, algo) for f in findings],
    )
    return Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=stable_uid(f"{key}/sr-series"),
        series_number=9901,
        sop_instance_uid=stable_uid(f"{key}/sr"),
        instance_number=1,
        manufacturer="cxr-fhir",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=("UNTRAINED " if algorithm.untrained else "") + "AI chest X-ray triage",
    )
