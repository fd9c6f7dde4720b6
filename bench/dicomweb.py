"""POST → report latency of the DICOMweb path next to the Media path, in one run.

One stack of its own (HAPI, PostgreSQL, the embedded Orthanc, ``cxr serve``, one ``cxr
worker``, untrained models): the same NIH sample images, one study at a time, alternating

* **Media path**: one FHIR transaction (Patient, ImagingStudy, Media with the PNG inline) →
  the report found by polling HAPI;
* **DICOMweb path**: the PNG wrapped as a CR instance, ``cxr ingest dicom``'s loop (STOW-RS to
  Orthanc, then Patient + ServiceRequest + Endpoint + ImagingStudy in one transaction) → the
  worker's QIDO/WADO-RS, model pass, SR + Segmentation STOW-RS back → the report found. The
  clock starts before the STOW, so the PACS round trips are all inside the figure.

Prints, never asserts. Data dir ``.cxr-data/bench-dicomweb`` (wiped at start but the ONNX
models), ports HAPI 18380, PostgreSQL 15580, service 18301, Orthanc 18342.

    .venv/bin/python bench/dicomweb.py --studies 6
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import load, stack_settings, wait_for  # noqa: E402
from fhir_service.dicom.sr import stable_uid  # noqa: E402
from fhir_service.dicom.wrap import WrapSpec, wrap_image  # noqa: E402
from fhir_service.fhir import identifiers  # noqa: E402
from fhir_service.fhir.client import FhirClient  # noqa: E402
from fhir_service.ingest.dicom_files import ingest_dicom  # noqa: E402
from fhir_service.ingest.nih import read_manifest  # noqa: E402
from fhir_service.ingest.transaction import created_id, study_bundle  # noqa: E402
from fhir_service.ops import hapi_server, orthanc  # noqa: E402
from fhir_service.ops.database import start_database, stop_database  # noqa: E402
from fhir_service.ops.stack import start_service, start_workers, stop_all  # noqa: E402
from fhir_service.runtime import build_pacs, model_version_for  # noqa: E402


def _report(fhir: FhirClient, study_id: str, model_version: str) -> bool:
    system, value = identifiers.study_model_identifier(study_id, model_version)
    found = fhir.search("DiagnosticReport", {"identifier": f"{system}|{value}", "_elements": "id"})
    return bool(found.get("entry"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6, help="studies per path")
    args = parser.parse_args()
    data_dir = REPO / ".cxr-data" / "bench-dicomweb"
    for child in data_dir.glob("*"):
        if child.name != "models":
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    settings = stack_settings(
        data_dir, hapi_port=18380, pg_port=15580, service_port=18301, orthanc_http_port=18342
    )
    manifest = settings.shared_dir / "data" / "nih-sample" / "manifest.csv"
    records = list(read_manifest(manifest))[: args.studies * 2]
    media_s: list[float] = []
    dicomweb_s: list[float] = []
    run = f"{time.time():.0f}"
    try:
        start_database(settings)
        hapi_server.start(settings)
        orthanc.start(settings)
        start_service(settings)
        start_workers(settings, 1)
        model_version = model_version_for(settings)
        pacs = build_pacs(settings)
        with (
            FhirClient(settings.fhir_base_url, timeout=120) as fhir,
            tempfile.TemporaryDirectory() as tmp,
        ):
            for i, rec in enumerate(records):
                png = (manifest.parent / rec.image_index).read_bytes()
                t0 = time.monotonic()
                if i % 2 == 0:
                    sid = created_id(
                        fhir.transaction(study_bundle(rec, png, tag=run)), "ImagingStudy"
                    )
                    times = media_s
                else:
                    uid = stable_uid(f"bench/{run}/{rec.image_index}")
                    ds = wrap_image(
                        png,
                        WrapSpec(
                            patient_id=f"B{run}-{rec.patient_id}",
                            patient_name="Bench^Patient",
                            study_uid=uid,
                            series_uid=uid + ".1",
                            sop_uid=uid + ".1.1",
                            accession=f"B{i}{run}"[:16],
                            view_position=rec.view_position,
                        ),
                    )
                    path = Path(tmp) / f"{i}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    report = ingest_dicom([path], fhir, pacs, max_bytes=settings.max_image_bytes)
                    sid = report.studies[0].imaging_study.split("/")[1]
                    times = dicomweb_s
                wait_for(
                    f"the report of ImagingStudy/{sid}",
                    lambda sid=sid: _report(fhir, sid, model_version),  # type: ignore[misc]
                    300,
                )
                times.append(time.monotonic() - t0)
                path_name = "media   " if i % 2 == 0 else "dicomweb"
                print(f"{path_name} ImagingStudy/{sid}: {times[-1]:.2f} s", flush=True)
    finally:
        stop_all(settings)
        orthanc.stop(settings)
        hapi_server.stop(settings)
        stop_database(settings)
    med_m, med_d = statistics.median(media_s), statistics.median(dicomweb_s)
    print(f"load {load()}; untrained models; one study at a time")
    for name, xs, med in (
        ("Media path    POST", media_s, med_m),
        ("DICOMweb path STOW", dicomweb_s, med_d),
    ):
        print(
            f"{name}→report median {med:.2f} s (n={len(xs)}, min {min(xs):.2f}, max {max(xs):.2f})"
        )
    print(f"ratio DICOMweb / Media: {med_d / med_m:.2f}")


if __name__ == "__main__":
    main()
