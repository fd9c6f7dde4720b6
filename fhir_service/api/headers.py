"""Response headers every answer of ``cxr serve`` carries, added in one ASGI middleware.

- ``X-Content-Type-Options: nosniff`` everywhere: a browser must take each answer for the
  type it declares (the app's images are PNGs our decoder wrote; JSON is JSON).
- Under ``/app``: ``Referrer-Policy: no-referrer`` (the callback URL carries a code) and, for
  everything that is not one of the app's own pages (which set their strict CSP
  themselves, :mod:`fhir_service.app_ui.routes`), ``Content-Security-Policy: default-src
  'none'; sandbox`` and ``Cross-Origin-Resource-Policy: same-origin``: JSON or an image
  opened directly runs nothing, and another origin cannot embed it.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        in_app = str(scope.get("path", "")).startswith("/app")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if in_app:
                    headers["Referrer-Policy"] = "no-referrer"
                    if "content-security-policy" not in headers:
                        headers["Content-Security-Policy"] = API_CSP
                        headers["Cross-Origin-Resource-Policy"] = "same-origin"
            await send(message)

        await self.app(scope, receive, send_with_headers)
