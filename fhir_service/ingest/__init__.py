"""``cxr ingest``: bulk-load an archive (NIH ChestX-ray14) into the FHIR server.

========================  ====================================================================
``nih``                   the NIH files (metadata CSV, bounding boxes), read and validated
``rows``                  valid rows and bad lines; batches cut between patients
``transaction``           the one NIH → FHIR builder (Patient, ImagingStudy, image Media)
``state``                 resumable progress shared by concurrent runs
``commit``                sending batches: retries, lost races, updates of existing studies
``report``                what a run did
``run``                   one run: :func:`ingest`
========================  ====================================================================
"""

from fhir_service.ingest.nih import BadLine
from fhir_service.ingest.report import IngestReport
from fhir_service.ingest.rows import Row, build_batches, file_sha256, read_rows
from fhir_service.ingest.run import IngestOptions, Progress, ingest, load_boxes
from fhir_service.ingest.transaction import build_transaction

__all__ = [
    "BadLine",
    "IngestOptions",
    "IngestReport",
    "Progress",
    "Row",
    "build_batches",
    "build_transaction",
    "file_sha256",
    "ingest",
    "load_boxes",
    "read_rows",
]
