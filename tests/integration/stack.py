"""A running cxr stack for integration tests: HAPI + PostgreSQL + service + worker processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg

from fhir_service.fhir import identifiers
from fhir_service.fhir.client import FhirClient
from fhir_service.ingest.nih import NihRecord, read_manifest
from fhir_service.ingest.transaction import created_id, image_media_resource, study_bundle
from fhir_service.runtime import model_version_for
from fhir_service.settings import Settings
from subscriptions.bootstrap import SECRET_HEADER
from tests.factories import unique_suffix

WAIT_S = 120.0


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


class Stack:
    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.fhir = FhirClient(settings.fhir_base_url, timeout=60)
        self.model_version = model_version_for(settings)
        self.records: list[NihRecord] = list(
            read_manifest(settings.shared_dir / "data" / "nih-sample" / "manifest.csv")
        )

    def post_study(
        self, index: int = 0, image: bytes | str | None = "real", *, tag: str | None = None
    ) -> str:
        """Post NIH sample study ``index`` with its Patient and pixels; ``tag`` keeps the
        identifiers apart from other tests' (studies posted with one tag share patients).
        ``image=None`` posts the study ``available`` without any pixels."""
        rec = self.records[index]
        data: bytes | None
        if image == "real":
            data = (self.settings.shared_dir / "data" / "nih-sample" / rec.image_index).read_bytes()
        else:
            data = image if isinstance(image, bytes) or image is None else None
        bundle = study_bundle(rec, data, tag=tag or unique_suffix(), status="available")
        return created_id(self.fhir.transaction(bundle), "ImagingStudy")

    def post_image(self, study_id: str, index: int = 0, image: bytes | None = None) -> str:
        """Post a Media with the NIH image ``index`` (or ``image``) for an existing study, as
        a PACS-fed EHR does after registering the study."""
        study = self.fhir.read("ImagingStudy", study_id)
        rec = self.records[index]
        data = (
            image
            or (self.settings.shared_dir / "data" / "nih-sample" / rec.image_index).read_bytes()
        )
        media = image_media_resource(
            rec, data, f"ImagingStudy/{study_id}", study["subject"]["reference"]
        )
        media["identifier"][0]["value"] += f"-late-{study_id}-{unique_suffix()}"
        return str(self.fhir.create(media)["id"])

    def reports(self, study_id: str) -> list[dict[str, Any]]:
        system, value = identifiers.study_model_identifier(study_id, self.model_version)
        return list(self.fhir.search_all("DiagnosticReport", {"identifier": f"{system}|{value}"}))

    def current_reports(self, study_id: str) -> list[dict[str, Any]]:
        """:meth:`reports` that are not withdrawn (cancelled, entered-in-error)."""
        return [
            r
            for r in self.reports(study_id)
            if r.get("status") not in ("cancelled", "entered-in-error")
        ]

    def task(self, study_id: str) -> dict[str, Any] | None:
        system, value = identifiers.task_identifier(study_id)
        tasks = list(self.fhir.search_all("Task", {"identifier": f"{system}|{value}"}))
        assert len(tasks) <= 1, "a study must have at most one Task"
        return tasks[0] if tasks else None

    def jobs(self, status: str | None = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT id, status::text, args->>'study_id', args->>'version_id' "
                "FROM procrastinate_jobs "
                "WHERE task_name = 'cxr.process_study' ORDER BY id"
            ).fetchall()
        return [r for r in rows if status is None or r[1] == status]

    def burst_jobs(self, study_id: str, versions: range) -> list[tuple[Any, ...]]:
        """The jobs of ``study_id`` that a :meth:`notify_burst` of ``versions`` queued; HAPI's
        own notifications of the study and its Media (which may arrive during the burst) name
        other versions, so they are not counted."""
        named = {str(v) for v in versions}
        return [j for j in self.jobs() if j[2] == study_id and j[3] in named]

    def notify_burst(self, study: dict[str, Any], versions: range) -> list[httpx.Response]:
        """The rest-hook notification of ``study`` once per version in ``versions``, 16 at a
        time (as HAPI redelivers), each with that ``meta.versionId``."""
        hook = f"{self.settings.service_url}/hook/ImagingStudy/{study['id']}"
        headers = {SECRET_HEADER: self.settings.subscription_secret}
        bodies = [{**study, "meta": {**study["meta"], "versionId": str(v)}} for v in versions]
        with httpx.Client(timeout=30) as http, ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda body: http.put(hook, json=body, headers=headers), bodies))

    def drained(self) -> bool:
        return not any(r[1] in ("todo", "doing") for r in self.jobs())
