"""Benchmark the HAPI FHIR server of hapi-fhir/: build, boot, memory, rest-hook latency.

Prints figures measured in this run; asserts nothing. Uses its own data dir
(``{data_dir}/bench``, wiped first) and port (default 18180), so it neither disturbs a demo
stack nor the test suite.

    .venv/bin/python bench/hapi.py                # boot (fresh + restart), RSS, latency x20
    .venv/bin/python bench/hapi.py --rebuild      # also a warm `mvn package` after a touch

The cold build (empty ~/.m2) is not repeated here: it would mean deleting the Maven cache.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from fhir_service.ops import hapi_server
from fhir_service.settings import Settings

FHIR_JSON = "application/fhir+json"


class _Receiver:
    """Rest-hook endpoint that records when each ImagingStudy id arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                now = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                rid = self.path.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
                with outer.cond:
                    outer.arrived.setdefault(rid, now)
                    outer.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def wait(self, rid: str, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while rid not in self.arrived:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.arrived[rid]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _rss_mib(settings: Settings) -> str:
    st = hapi_server.status(settings)
    return f"{st.rss_bytes / 2**20:.0f} MiB" if st.rss_bytes else "?"


def _study(pid: str, status: str = "available") -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "status": status,
        "subject": {"reference": f"Patient/{pid}"},
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}],
    }


def _latency(settings: Settings, n: int) -> list[float]:
    receiver = _Receiver()
    client = httpx.Client(
        base_url=settings.fhir_base_url,
        headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON},
        timeout=60,
    )
    try:
        sub = {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "bench",
            "criteria": "ImagingStudy?status=available",
            "channel": {
                "type": "rest-hook",
                "endpoint": receiver.endpoint,
                "payload": FHIR_JSON,
                "header": ["X-Cxr-Secret: bench"],
            },
        }
        sub_id = client.post("/Subscription", json=sub).json()["id"]
        t0 = time.monotonic()
        while client.get(f"/Subscription/{sub_id}").json()["status"] != "active":
            if time.monotonic() - t0 > 60:
                raise SystemExit("subscription did not become active in 60 s")
            time.sleep(0.1)
        print(f"subscription active after      {time.monotonic() - t0:6.2f} s")
        pid = client.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
        # One warm-up delivery: the first write also warms the validator and the HTTP client.
        warm = client.post("/ImagingStudy", json=_study(pid)).json()["id"]
        receiver.wait(warm, 60)
        out: list[float] = []
        for _ in range(n):
            t0 = time.monotonic()
            rid = client.post("/ImagingStudy", json=_study(pid)).json()["id"]
            arrived = receiver.wait(rid, 60)
            if arrived is None:
                print(f"  ImagingStudy/{rid}: no delivery within 60 s")
                continue
            out.append(arrived - t0)
        client.delete(f"/Subscription/{sub_id}")
        return out
    finally:
        client.close()
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=18180)
    parser.add_argument("--n", type=int, default=20, help="deliveries to time")
    parser.add_argument("--rebuild", action="store_true", help="time a warm mvn package")
    args = parser.parse_args()

    base = Settings()
    settings = Settings(data_dir=base.data_dir / "bench", hapi_port=args.port)
    hapi_server.stop(settings)
    shutil.rmtree(settings.data_dir, ignore_errors=True)

    if args.rebuild:
        # A touched source forces Maven to recompile and repackage, with a warm ~/.m2.
        src = next(Path(settings.hapi_jar.parent.parent, "src", "main", "java").rglob("*.java"))
        src.touch()
        t0 = time.monotonic()
        hapi_server.build_jar(settings, force=True, progress=lambda _msg: None)
        print(f"warm rebuild (mvn -q package)  {time.monotonic() - t0:6.1f} s")
    else:
        hapi_server.build_jar(settings)
    jar_mib = settings.hapi_jar.stat().st_size / 2**20
    print(f"jar size                       {jar_mib:6.0f} MiB")

    try:
        fresh = hapi_server.start(settings)
        print(f"boot to /metadata, fresh dir   {fresh:6.1f} s   (heap -Xmx{settings.hapi_heap})")
        print(f"RSS after boot                 {_rss_mib(settings):>8}")
        lat = _latency(settings, args.n)
        if lat:
            lat.sort()
            p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
            print(
                f"rest-hook latency (n={len(lat)})      median {statistics.median(lat):.2f} s, "
                f"p95 {p95:.2f} s, max {lat[-1]:.2f} s "
                f"(interval {settings.hapi_subscription_interval_ms} ms)"
            )
        print(f"RSS after subscription run     {_rss_mib(settings):>8}")
        hapi_server.stop(settings)
        again = hapi_server.start(settings)
        print(f"boot to /metadata, existing db {again:6.1f} s")
    finally:
        hapi_server.stop(settings)


if __name__ == "__main__":
    main()
