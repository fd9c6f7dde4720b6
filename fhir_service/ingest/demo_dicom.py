"""The demo's DICOM: NIH sample PNGs wrapped as CR instances (what a modality would send),
plus the real DICOM files in ``shared/data/dicom`` (JPEG 2000, MONOCHROME1, 15-bit), written
to ``{data_dir}/demo-dicom`` for ``cxr ingest dicom``. The wrapped instances' UIDs are the NIH
records' own (``NihRecord.study_uid`` …), so running the demo again stores the same studies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fhir_service.dicom.wrap import WrapSpec, wrap_image
from fhir_service.ingest.nih import NihRecord
from fhir_service.settings import Settings

__all__ = ["demo_dicom_files"]


def _spec(rec: NihRecord) -> WrapSpec:
    return WrapSpec(
        patient_id=f"NIH-{rec.patient_id}",
        patient_name=f"NIH^{rec.patient_id}",
        study_uid=rec.study_uid,
        series_uid=rec.series_uid,
        sop_uid=rec.instance_uid,
        accession=rec.image_index.removesuffix(".png").replace("_", "")[:16],
        view_position=rec.view_position,
        sex={"male": "M", "female": "F"}.get(rec.sex, ""),
        age_years=rec.age_years,
    )


def demo_dicom_files(settings: Settings, records: Sequence[NihRecord]) -> list[Path]:
    out = settings.data_dir / "demo-dicom"
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    images = settings.shared_dir / "data" / "nih-sample"
    for rec in records:
        path = out / f"{rec.image_index}.dcm"
        if not path.exists():
            ds = wrap_image((images / rec.image_index).read_bytes(), _spec(rec))
            ds.save_as(path, enforce_file_format=True)
        files.append(path)
    real = settings.shared_dir / "data" / "dicom"
    files += sorted(real.glob("*.dcm")) if real.is_dir() else []
    return files
