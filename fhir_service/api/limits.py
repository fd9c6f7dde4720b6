"""Request bodies: a size limit enforced before anything parses them, and JSON parsed with a
bounded nesting depth.

:class:`BodyLimit` is ASGI middleware for ``cxr serve`` and ``cxr dev-ehr``. A declared
``Content-Length`` over the limit is answered 413 at once, without reading a byte; a body
sent without one (chunked) is counted as it arrives and cut off at the limit. Either way
the answer is an ``OperationOutcome`` (``too-costly``), and the endpoint never sees a body
larger than its limit. ``POST …/$similar`` may carry an image and has its own, larger limit.

:func:`parse_json` refuses nesting deeper than :data:`MAX_JSON_DEPTH` (FHIR resources are
nowhere near it): Python's parser raises ``RecursionError`` on ``[`` × 100,000, and code
that walks a parsed document recursively could fail on far less.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxr_errors import InputError, PayloadTooLargeError
from fhir_service.api.responses import FHIR_JSON
from fhir_service.fhir.outcome import operation_outcome

#: Deepest nesting accepted in a JSON body (a FHIR transaction Bundle is about 10 deep).
MAX_JSON_DEPTH = 64


def parse_json(raw: bytes, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``raw`` parsed, or InputError naming ``what`` (not JSON, not UTF-8, too deep)."""
    try:
        value = json.loads(raw)
    except RecursionError as exc:
        raise InputError(f"{what} is nested too deeply (limit {max_depth} levels)") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InputError(f"{what} is not JSON: {exc}") from exc
    if json_depth(value) > max_depth:
        raise InputError(f"{what} is nested too deeply (limit {max_depth} levels)")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in node if isinstance(child, dict | list))
    return deepest


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BodyLimit:
    """Refuse request bodies over ``limit_for(path)`` bytes before the app reads them."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(str(scope.get("path", "")))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, _message(limit, declared))
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge as exc:
            if started:
                raise
            await _refuse(send, _message(exc.limit, None))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None


def _message(limit: int, declared: int | None) -> str:
    size = f"{declared} bytes" if declared is not None else "more"
    return f"the request body is {size}; the limit here is {limit} bytes"


async def _refuse(send: Send, text: str) -> None:
    error = PayloadTooLargeError(text)
    body = json.dumps(operation_outcome(error.message, code=error.issue_code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.http_status,
            "headers": [
                (b"content-type", FHIR_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
