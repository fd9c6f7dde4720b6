"""Which EHRs may launch the app (``CXR_APP_ISSUERS``): exact FHIR bases or one-segment
patterns, and for anything else neither a server-side request nor a redirect, in any mode.

Issue 13: with no allow-list (the dev default) ``/app/launch?iss=…`` fetched from any host
and redirected to whatever authorization URL it named; simulator-style per-launch URLs could
only be allow-listed one by one.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cxr_errors import ConfigError
from fhir_service.app_ui import routes
from fhir_service.app_ui.service import AppUi
from fhir_service.issuers import check_pattern, issuer_allowed
from fhir_service.settings import Settings

SIM = "https://launch.smarthealthit.org/v/r4/sim/*/fhir"


@pytest.mark.parametrize(
    "iss",
    [
        "https://ehr.example.org/fhir",
        "https://ehr.example.org/fhir/",
        "https://launch.smarthealthit.org/v/r4/sim/WzMsIiIsIiIsIkFVVE8iLDBd/fhir",
        "https://launch.smarthealthit.org/v/r4/sim/eyJoIjoiMSJ9=/fhir",
    ],
)
def test_listed_issuers_and_pattern_matches_are_allowed(iss: str) -> None:
    assert issuer_allowed(iss, ["https://ehr.example.org/fhir", SIM])


@pytest.mark.parametrize(
    "iss",
    [
        "https://ehr.example.org/fhir2",
        "https://ehr.example.org/fhir/../admin",
        "https://ehr.example.org/fhir/%2e%2e",
        "https://ehr.example.org/fhir?x=1",
        "https://ehr.example.org/fhir#x",
        "https://ehr.example.org@evil.test/fhir",
        "https://evil.test/?https://ehr.example.org/fhir",
        "https://ehr.example.org.evil.test/fhir",
        "https://ehr.example.org./fhir",
        "http://ehr.example.org/fhir",
        "https://ehr.example.org:8443/fhir",
        "https://launch.smarthealthit.org/v/r4/sim/a/b/fhir",
        "https://launch.smarthealthit.org/v/r4/sim//fhir",
        "https://launch.smarthealthit.org/v/r4/sim/../../fhir",
        "https://launch.smarthealthit.org/v/r4/sim/x/fhir/extra",
        "https://launch.smarthealthit.org.evil.test/v/r4/sim/x/fhir",
        "https://[::1]/fhir",
        "https://2130706433/fhir",
        "javascript:alert(1)//https://ehr.example.org/fhir",
        "https://ehr.example.org\\@evil.test/fhir",
        " https://ehr.example.org/fhir",
    ],
)
def test_everything_else_is_refused(iss: str) -> None:
    assert not issuer_allowed(iss, ["https://ehr.example.org/fhir", SIM])


@pytest.mark.parametrize(
    "entry",
    [
        "https://*.example.org/fhir",
        "http*://ehr.example.org/fhir",
        "https://ehr.example.org:*/fhir",
        "*",
        "ftp://ehr.example.org/fhir",
        "https://user@ehr.example.org/fhir",
        "https://ehr.example.org/fhir?x=*",
    ],
)
def test_a_pattern_must_spell_out_scheme_host_and_port(entry: str) -> None:
    with pytest.raises(ConfigError):
        check_pattern(entry)
    with pytest.raises(ConfigError):
        Settings(app_issuers=[entry])


def test_no_list_in_dev_means_the_dev_ehr_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dev_ehr_port=10002)
    assert settings.app_issuer_allow_list == ["http://127.0.0.1:10002/fhir"]
    listed = Settings(data_dir=tmp_path, app_issuers=[SIM])
    assert listed.app_issuer_allow_list == [SIM]


class Recorder:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(
            200,
            json={
                "authorization_endpoint": "https://evil.test/authorize",
                "token_endpoint": "https://evil.test/token",
                "code_challenge_methods_supported": ["S256"],
            },
        )


@pytest.mark.parametrize("mode", ["dev", "prod"])
@pytest.mark.parametrize(
    "iss",
    [
        "http://evil.test/fhir",
        "http://127.0.0.1:10002@evil.test/fhir",
        "http://[::1]:10002/fhir",
        "http://2130706433:10002/fhir",
        "http://localhost.:10002/fhir",
        "http://127.0.0.1:10002/fhir/../../evil",
    ],
)
def test_an_unlisted_issuer_gets_no_request_and_no_redirect(
    tmp_path: Path, mode: str, iss: str
) -> None:
    recorder = Recorder()
    settings = Settings(
        data_dir=tmp_path,
        mode=mode,  # type: ignore[arg-type]
        dev_ehr_port=10002,
        subscription_secret="s" * 32,
        app_session_secret="t" * 32,
        service_api_key="u" * 32,
        app_issuers=[] if mode == "dev" else ["http://127.0.0.1:10002/fhir"],
    )
    ui = AppUi(settings, transport=httpx.MockTransport(recorder))
    app = FastAPI()
    app.include_router(routes.router)
    app.state.app_ui = ui
    client = TestClient(app, follow_redirects=False)
    resp = client.get("/app/launch", params={"iss": iss, "launch": "x"})
    assert resp.status_code == 400
    assert "not an EHR this app trusts" in resp.text
    assert "location" not in resp.headers
    assert recorder.requests == []
    # The listed one is fetched (and redirected to what it names: it is trusted).
    ok = client.get("/app/launch", params={"iss": "http://127.0.0.1:10002/fhir"})
    assert ok.status_code == 303
    assert [str(r.url) for r in recorder.requests] == [
        "http://127.0.0.1:10002/fhir/.well-known/smart-configuration"
    ]
