"""``/healthz``: HAPI, database, queue and model state in one answer."""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from cxr_errors import CxrError
from fhir_service.deps import FhirDep, SettingsDep
from fhir_service.ops.database import database_url

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(settings: SettingsDep, fhir: FhirDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        cap = fhir.capability_statement()
        checks["hapi"] = {"ok": True, "url": fhir.base_url, "fhirVersion": cap.get("fhirVersion")}
    except CxrError as exc:
        checks["hapi"] = {"ok": False, "url": fhir.base_url, "error": exc.message}
    try:
        with psycopg.connect(database_url(settings), connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY status"
            ).fetchall()
            workers = conn.execute(
                "SELECT count(*) FROM procrastinate_workers "
                "WHERE last_heartbeat > now() - interval '30 seconds'"
            ).fetchone()
        checks["database"] = {"ok": True}
        checks["queue"] = {
            "ok": True,
            "jobs": {status: n for status, n in rows},
            "live_workers": workers[0] if workers else 0,
        }
    except psycopg.Error as exc:
        checks["database"] = {"ok": False, "error": str(exc).strip()}
        checks["queue"] = {"ok": False}
    untrained = settings.model_weights == "untrained"
    checks["model"] = {
        "ok": True,
        "weights": settings.model_weights,
        "untrained": untrained,
        "note": "UNTRAINED model: outputs are not findings" if untrained else None,
    }
    clip_untrained = settings.clip_weights == "untrained"
    checks["clip"] = {
        "ok": True,
        "model": settings.clip_model,
        "weights": settings.clip_weights or settings.clip_pretrained,
        "untrained": clip_untrained,
        "note": "UNTRAINED CLIP: similar-case rankings and tags mean nothing"
        if clip_untrained
        else None,
    }
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", **checks}, 200 if ok else 503)
