"""A port held by a stranger is refused before a managed process starts."""

from __future__ import annotations

import socket

import pytest

from cxr_errors import ServiceError
from fhir_service.ops.procs import ensure_port_free, port_in_use


def test_a_held_port_is_refused_with_the_setting_to_change() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        with pytest.raises(
            ServiceError, match=rf"127\.0\.0\.1:{port} for cxr serve .*CXR_SERVICE_PORT"
        ):
            ensure_port_free("127.0.0.1", port, "cxr serve", "CXR_SERVICE_PORT")
    # Closed: free again.
    assert not port_in_use("127.0.0.1", port)
    ensure_port_free("127.0.0.1", port, "cxr serve", "CXR_SERVICE_PORT")
