"""The SMART app in Chromium against plain sequential FHIR requests for the same data.

Measured in one run on one machine, against one stack (HAPI + PostgreSQL + ``cxr serve`` +
one worker + ``cxr dev-ehr``), on three NIH studies of one patient:

* **launch → worklist rendered**: a fresh browser context opens the dev EHR's launch URL
  (launch → authorize → callback → token → worklist page → its JSON → table drawn), p50
  over 20; **the peer** does the same protocol and reads the same FHIR data with httpx,
  one request after another (launch link, discovery, authorize, token, ImagingStudy,
  DiagnosticReport + Observations, failed Tasks), no rendering.
* **click → overlay shown** for findings with a stored heatmap Media, p50 over 20 clicks;
  the peer: ``Media?part-of=ImagingStudy/{id}`` through the proxy and decoding the PNG.
  Also the first on-demand render (the classifier loads in the service) and warm on-demand
  clicks (the app has no peer for those: the CAMs are not in FHIR).

Prints, never asserts. Untrained mode (weights cannot be downloaded here). Own data dir and
ports (``.cxr-data/bench-app``, HAPI 19480, PostgreSQL 19680, service 19401, dev EHR 19402),
wiped at start except the exported ONNX models.

    .venv/bin/python bench/app.py                # p50 over 20 launches / clicks
    .venv/bin/python bench/app.py --repeat 5     # a quicker look

Options: ``--repeat`` (20), ``--chromium`` (the browser binary, /usr/bin/chromium),
``--data-dir``, ``--hapi-port``, ``--pg-port``, ``--service-port``, ``--dev-ehr-port``.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

from fhir_service.app_ui import clinical  # noqa: E402
from fhir_service.app_ui.smart import EHR_SCOPES, s256_challenge  # noqa: E402
from fhir_service.fhir import identifiers  # noqa: E402
from fhir_service.fhir.client import FhirClient  # noqa: E402
from fhir_service.ingest.nih import read_manifest  # noqa: E402
from fhir_service.ingest.transaction import created_id, study_bundle  # noqa: E402
from fhir_service.ops import hapi_server  # noqa: E402
from fhir_service.ops.database import start_database, stop_database  # noqa: E402
from fhir_service.ops.stack import (  # noqa: E402
    start_dev_ehr,
    start_service,
    start_workers,
    stop_all,
    stop_dev_ehr,
)
from fhir_service.runtime import model_version_for  # noqa: E402
from fhir_service.settings import Settings  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
#: Default repeats per measurement (p50 over this many).
N = 20


def p50_ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} ms (min {min(xs) * 1000:.1f}, n={len(xs)})"


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def peer_token(s: Settings, http: httpx.Client, patient: str) -> str:
    """The EHR launch done by hand, as plain requests (no browser, no app server)."""
    loc = http.get(f"{s.dev_ehr_url}/launch/ehr", params={"patient": patient}).headers["location"]
    q = {k: v[0] for k, v in parse_qs(urlsplit(loc).query).items()}
    config = http.get(f"{q['iss']}/.well-known/smart-configuration").json()
    verifier, state = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    redirect = f"{s.service_url}/app/callback"
    resp = http.get(
        config["authorization_endpoint"],
        params={
            "response_type": "code",
            "client_id": s.app_client_id,
            "redirect_uri": redirect,
            "scope": EHR_SCOPES,
            "state": state,
            "aud": q["iss"],
            "code_challenge": s256_challenge(verifier),
            "code_challenge_method": "S256",
            "launch": q["launch"],
        },
    )
    code = parse_qs(urlsplit(resp.headers["location"]).query)["code"][0]
    token = http.post(
        config["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect,
            "client_id": s.app_client_id,
            "code_verifier": verifier,
        },
    ).json()
    return str(token["access_token"])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=N, help=f"launches / clicks per p50 (default {N})"
    )
    parser.add_argument("--chromium", default=CHROMIUM, help=f"browser binary (default {CHROMIUM})")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".cxr-data" / "bench-app")
    parser.add_argument("--hapi-port", type=int, default=19480)
    parser.add_argument("--pg-port", type=int, default=19680)
    parser.add_argument("--service-port", type=int, default=19401)
    parser.add_argument("--dev-ehr-port", type=int, default=19402)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    n = args.repeat
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    s = Settings(
        data_dir=args.data_dir,
        hapi_port=args.hapi_port,
        pg_port=args.pg_port,
        service_port=args.service_port,
        dev_ehr_port=args.dev_ehr_port,
        model_weights="untrained",
        clip_weights="untrained",
        database_url=None,
        hapi_base_url=None,
        service_public_url=None,
        dev_ehr_public_url=None,
    )

    def stop() -> None:
        stop_dev_ehr(s)
        stop_all(s)
        hapi_server.stop(s)
        stop_database(s)

    stop()
    for sub in (s.hapi_dir, s.pg_dir, s.log_dir, s.run_dir, s.dev_ehr_dir):
        shutil.rmtree(sub, ignore_errors=True)
    print("SMART app (Chromium + cxr serve /app) vs plain sequential FHIR requests")
    print("  UNTRAINED mode: pretrained weights cannot be downloaded here")
    print(f"  load average at start: {os.getloadavg()}")
    try:
        hapi_server.start(s, progress=lambda _m: None)
        start_database(s)
        start_service(s)
        start_workers(s, 1)
        start_dev_ehr(s)
        records = list(read_manifest(s.shared_dir / "data" / "nih-sample" / "manifest.csv"))
        fhir = FhirClient(s.fhir_base_url, timeout=60)
        tag = secrets.token_hex(4)
        studies, patient = [], ""
        for i in (1, 2, 3):
            raw = (s.shared_dir / "data" / "nih-sample" / records[i].image_index).read_bytes()
            answer = fhir.transaction(study_bundle(records[i], raw, tag=tag))
            studies.append(created_id(answer, "ImagingStudy"))
            patient = created_id(answer, "Patient")
        version = model_version_for(s)
        deadline = time.monotonic() + 600
        for sid in studies:
            system, value = identifiers.study_model_identifier(sid, version)
            while not list(
                fhir.search_all("DiagnosticReport", {"identifier": f"{system}|{value}"})
            ):
                if time.monotonic() > deadline:
                    raise SystemExit(f"no report for ImagingStudy/{sid} after 600 s")
                time.sleep(0.5)
        launch_url = f"{s.dev_ehr_url}/launch/ehr?patient={patient}"

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])

            def app_launch() -> None:
                ctx = browser.new_context(viewport={"width": 1280, "height": 800})
                page = ctx.new_page()
                page.goto(launch_url)
                page.wait_for_selector(f"#worklist[data-rendered='{len(studies)}']")
                ctx.close()

            app_launch()  # warm-up (first page load, connection set-up)
            app_launch_s = timed(app_launch, n)

            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            page = ctx.new_page()
            page.goto(launch_url)
            page.wait_for_selector("#worklist tbody tr a")
            top = page.locator("#worklist tbody tr").first.get_attribute("data-study")
            page.goto(f"{s.service_url}/app/study/{top}")
            page.wait_for_selector("#findings[data-count='14']")
            page.wait_for_selector("#xray[data-loaded='true']")
            stored = page.locator(".finding-button", has_text="▲")
            others = page.locator(".finding-button:not(:has-text('▲'))")

            def click(button: object, finding: str) -> None:
                button.click()  # type: ignore[attr-defined]
                page.wait_for_selector(f"#xray[data-overlay='{finding}']", timeout=300_000)

            def clicks(buttons: object, n: int) -> list[float]:
                out: list[float] = []
                count = buttons.count()  # type: ignore[attr-defined]
                # Alternate between two findings so every click draws a new overlay.
                picks = [buttons.nth(i % min(count, 2)) for i in range(n)]  # type: ignore[attr-defined]
                for b in picks:
                    finding = b.get_attribute("data-finding")
                    if page.locator("#xray").get_attribute("data-overlay") == finding:
                        b.click()  # toggle off first
                    t = time.perf_counter()
                    click(b, finding)
                    out.append(time.perf_counter() - t)
                return out

            app_stored = clicks(stored, n) if stored.count() >= 2 else []
            cold: list[float] = []
            warm: list[float] = []
            if others.count() >= 2:
                b = others.nth(0)
                t = time.perf_counter()
                click(b, str(b.get_attribute("data-finding")))
                cold.append(time.perf_counter() - t)
                warm = clicks(others, n)
            ctx.close()
            browser.close()

        with httpx.Client(timeout=60) as http:
            token = peer_token(s, http, patient)
            auth = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
            base = s.dev_ehr_fhir_url

            def peer_launch() -> None:
                tok = peer_token(s, http, patient)
                h = {"Authorization": f"Bearer {tok}", "Accept": "application/fhir+json"}
                for path in (
                    "ImagingStudy?_count=100",
                    "DiagnosticReport?_count=100&_include=DiagnosticReport:result",
                    "Task?status=failed&_count=100",
                ):
                    http.get(f"{base}/{path}", headers=h).raise_for_status()

            def peer_overlay() -> None:
                resp = http.get(f"{base}/Media?part-of=ImagingStudy/{top}", headers=auth)
                media = clinical.heatmap_media(clinical.entries(resp.json()), str(top))
                for m in list(media.values())[:1]:
                    base64.b64decode(m["content"]["data"])

            peer_launch()
            peer_launch_s = timed(peer_launch, n)
            peer_overlay_s = timed(peer_overlay, n)

        print()
        print(f"launch URL → worklist rendered, p50 over {n}")
        print(f"  app (Chromium, launch + token + page + JSON + table) {p50_ms(app_launch_s)}")
        print(f"  peer (httpx: launch + token + 3 FHIR searches)       {p50_ms(peer_launch_s)}")
        print(f"click → overlay shown (stored heatmap Media), p50 over {n}")
        if app_stored:
            print(f"  app (Chromium, /app/api/heatmap → canvas)            {p50_ms(app_stored)}")
        else:
            print("  app: fewer than 2 positive findings with stored heatmaps in this run")
        print(f"  peer (httpx: Media?part-of + base64 decode)          {p50_ms(peer_overlay_s)}")
        if cold:
            print("click → overlay shown (on-demand: CAM recomputed in the service)")
            print(f"  first (loads the classifier)                        {cold[0] * 1000:8.1f} ms")
            print(f"  later clicks (cached pass), p50                     {p50_ms(warm)}")
            print("  peer: none (the CAMs of negative findings are not stored in FHIR)")
    finally:
        stop()


if __name__ == "__main__":
    main()
