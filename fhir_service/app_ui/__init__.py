"""The cxr SMART app at ``{service}/app``: worklist, study viewer, similar cases.

Tokens stay on the server (see :mod:`fhir_service.app_ui.session`); the pages are static
HTML + one vanilla JS file served from this package, calling ``/app/api/…`` on the same
origin.
"""

from fhir_service.app_ui.routes import router

__all__ = ["router"]
