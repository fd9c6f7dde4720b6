"""``cxr dev-ehr``: a development EHR launcher and SMART App Launch 2.x authorization server,
with a token-checked FHIR proxy in front of HAPI. DEVELOPMENT TOOL — not for production."""

from fhir_service.dev_ehr.app import build_ehr, create_app

__all__ = ["build_ehr", "create_app"]
