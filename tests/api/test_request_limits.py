"""Request bodies: refused over their limit before anything reads them, JSON nesting bounded,
every malformed input a 4xx OperationOutcome.

The middleware is driven through a real uvicorn server in a thread (TestClient would buffer
the whole body first and could not show that a large body is refused before it is read).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cxr_errors import InputError
from fhir_service.api.limits import MAX_JSON_DEPTH, BodyLimit, json_depth, parse_json

LIMIT = 1024
SIMILAR_LIMIT = 4096


def _limit_for(path: str) -> int:
    return SIMILAR_LIMIT if path.endswith("/$similar") else LIMIT


class Server:
    """An app behind BodyLimit that records how many body bytes its endpoint received."""

    def __init__(self) -> None:
        self.received: list[int] = []
        app = FastAPI()
        # As cxr serve and cxr dev-ehr do: inside FastAPI's own error middleware.
        app.add_middleware(BodyLimit, limit_for=_limit_for)

        @app.post("/echo")
        @app.post("/fhir/ImagingStudy/$similar")
        async def echo(request: Request) -> JSONResponse:
            body = await request.body()
            self.received.append(len(body))
            return JSONResponse({"bytes": len(body)})

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


def _outcome(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"] == "application/fhir+json"
    body: dict[str, Any] = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    return body


def test_a_body_within_the_limit_passes(server: Server) -> None:
    resp = httpx.post(server.url("/echo"), content=b"x" * LIMIT)
    assert resp.status_code == 200 and resp.json() == {"bytes": LIMIT}


def test_a_declared_oversized_body_is_refused_before_it_is_read(server: Server) -> None:
    before = len(server.received)
    resp = httpx.post(server.url("/echo"), content=b"x" * (LIMIT + 1))
    assert resp.status_code == 413
    assert _outcome(resp)["issue"][0]["code"] == "too-costly"
    assert len(server.received) == before, "the endpoint never ran"


def test_a_70_mb_body_is_refused_without_being_sent(server: Server) -> None:
    """The 413 comes from the headers; the client is not made to upload 70 MB first."""
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        chunk = b"[" * 1_048_576
        for _ in range(70):
            sent += len(chunk)
            yield chunk

    headers = {"Content-Length": str(70 * 1_048_576)}
    try:
        resp = httpx.post(server.url("/echo"), content=body(), headers=headers, timeout=30)
        assert resp.status_code == 413
    except httpx.TransportError:
        pass  # the server answered and closed while the client was still sending
    assert sent < 20 * 1_048_576


def test_a_chunked_oversized_body_is_cut_off(server: Server) -> None:
    before = len(server.received)

    def body() -> Iterator[bytes]:
        for _ in range(8):
            yield b"y" * 512

    resp = httpx.post(server.url("/echo"), content=body())  # no Content-Length: chunked
    assert resp.status_code == 413
    _outcome(resp)
    assert len(server.received) == before


def test_similar_has_its_own_larger_limit(server: Server) -> None:
    ok = httpx.post(server.url("/fhir/ImagingStudy/$similar"), content=b"z" * SIMILAR_LIMIT)
    assert ok.status_code == 200
    big = httpx.post(server.url("/fhir/ImagingStudy/$similar"), content=b"z" * (SIMILAR_LIMIT + 1))
    assert big.status_code == 413


# --- JSON -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        json.dumps(json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))).encode(),
    ],
    ids=["open-brackets", "deep-array", "deep-object", "just-over"],
)
def test_deep_nesting_is_an_input_error(raw: bytes) -> None:
    with pytest.raises(InputError, match="nested too deeply"):
        parse_json(raw, "the body")


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"nul\x00", b"[1,]", b"NaNx"])
def test_malformed_json_is_an_input_error(raw: bytes) -> None:
    with pytest.raises(InputError, match="not JSON"):
        parse_json(raw, "the body")


def test_json_at_the_depth_limit_is_accepted() -> None:
    raw = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(parse_json(raw.encode(), "the body")) == MAX_JSON_DEPTH
    assert json_depth({"a": [{"b": 1}], "c": 2}) == 3
    assert json_depth(5) == 0
