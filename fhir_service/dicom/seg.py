"""Heatmaps of flagged findings as one DICOM Segmentation (FRACTIONAL, PROBABILITY; highdicom).

Why a Segmentation: it is the standard object for "where on this image", it references its
source instance by SOP Instance UID, and PACS viewers (OHIF, Slicer, most AI result viewers)
overlay it on the source. A Parametric Map also overlays but wants float pixels and a frame of
reference a radiograph lacks; a secondary capture would only be a picture, not an overlay.

Each flagged finding is one segment whose fraction is the class activation map, min-max
normalised per finding (a CAM shows *where*, not *how much*: the SR carries the score),
placed over the centre square the model read and 0 outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pydicom
from highdicom import AlgorithmIdentificationSequence
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from highdicom.sr import CodedConcept
from PIL import Image

from fhir_service.dicom.sr import Algorithm, stable_uid

__all__ = ["HeatmapSegment", "build_heatmap_segmentation", "cam_to_fraction"]

#: SNOMED CT "Morphologically abnormal structure": the category of a finding's region.
ABNORMAL = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")


@dataclass(frozen=True)
class HeatmapSegment:
    name: str
    code: str
    scheme: str
    display: str
    cam: npt.NDArray[np.float32]
    """the finding's class activation map over the centre square (any small grid, e.g. 7x7)"""


def cam_to_fraction(
    cam: npt.NDArray[np.float32], rows: int, columns: int
) -> npt.NDArray[np.float32]:
    """``cam`` min-max normalised, resized onto the centre square of a rows x columns image."""
    lo, hi = float(cam.min()), float(cam.max())
    norm = (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)
    side = min(rows, columns)
    top, left = (rows - side) // 2, (columns - side) // 2
    square = Image.fromarray(norm.astype(np.float32), mode="F").resize(
        (side, side), Image.Resampling.BILINEAR
    )
    out = np.zeros((rows, columns), dtype=np.float32)
    out[top : top + side, left : left + side] = np.clip(np.asarray(square), 0.0, 1.0)
    return out


def build_heatmap_segmentation(
    source: pydicom.Dataset,
    segments: Sequence[HeatmapSegment],
    algorithm: Algorithm,
    *,
    key: str,
) -> pydicom.Dataset:
    """One Segmentation on ``source`` (a full image dataset) with one segment per heatmap."""
    rows, columns = int(source.Rows), int(source.Columns)
    label = "UNTRAINED " if algorithm.untrained else ""
    algo = AlgorithmIdentificationSequence(
        name=f"{label}{algorithm.name}"[:64],
        family=CodedConcept("113108", "DCM", "Artificial Intelligence"),
        version=algorithm.version[:64],
    )
    descriptions = [
        SegmentDescription(
            segment_number=i,
            segment_label=f"{label}{s.name} heatmap"[:64],
            segmented_property_category=ABNORMAL,
            segmented_property_type=CodedConcept(s.code, s.scheme, s.display),
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_id=s.name,
            tracking_uid=stable_uid(f"{source.SOPInstanceUID}/{s.name}"),
        )
        for i, s in enumerate(segments, start=1)
    ]
    fractions = np.stack([cam_to_fraction(s.cam, rows, columns) for s in segments], axis=-1)
    return Segmentation(
        source_images=[source],
        pixel_array=fractions[None],
        segmentation_type=SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=stable_uid(f"{key}/seg-series"),
        series_number=9902,
        sop_instance_uid=stable_uid(f"{key}/seg"),
        instance_number=1,
        manufacturer="cxr-fhir",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=algorithm.weights_sha256[:16] or "none",
        content_label="HEATMAP",
        content_description=f"{label}AI heatmaps (CAM) of flagged findings"[:64],
        series_description=f"{label}AI heatmaps"[:64],
    )
