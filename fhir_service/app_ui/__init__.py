"""The cxr SMART app at ``{service}/app``: worklist, study viewer, similar cases, reviews.

Tokens stay on the server (see :mod:`fhir_service.app_ui.session`); the pages are static
HTML + one vanilla JS file served from this package, calling ``/app/api/…`` on the same
origin. State-changing calls (:mod:`fhir_service.app_ui.writes`) need the CSRF token.
"""

from fhir_service.app_ui.routes import router
from fhir_service.app_ui.writes import router as _writes

router.include_router(_writes)

__all__ = ["router"]
