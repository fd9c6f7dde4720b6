"""The analytics API (fhirclient → DataFrame) against a fake FHIR server speaking HTTP through a
``requests`` adapter (the requests counterpart of httpx.MockTransport). The Observations it
serves are the builders' own output, stored as HAPI stores a transaction."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pandas as pd
import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from requests.adapters import BaseAdapter

from cxr_errors import ConfigError, FhirError, FhirUnavailableError, InputError
from fhir_service.analytics import (
    COLUMNS,
    BackendServices,
    BearerToken,
    ClientSecret,
    StandaloneLaunch,
    findings_frame,
    findings_search,
)
from fhir_service.fhir.results import build_result_transaction, score_name
from fhir_service.fhir.terminology import TERMINOLOGY
from models.types import NIH_FINDINGS, ImageAnalysis
from tests.factories import IMAGE_SHA256, RECORDED, make_analysis, make_heatmaps, make_study

FHIR = "http://fhir.test/fhir"
AUTH_SERVER = "http://auth.test"
TOKEN_URL = f"{AUTH_SERVER}/token"
NIH = TERMINOLOGY.code_system_url("nih_label")
AIAST = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue|AIAST"
Resource = dict[str, Any]
Handler = Callable[[requests.PreparedRequest], tuple[int, Any] | None]


def stored(
    analysis: ImageAnalysis, study_id: str, patient: str, *, recorded: Any = RECORDED
) -> list[Resource]:
    """The result transaction's resources as HAPI stores them: ids given, urn refs resolved."""
    bundle = build_result_transaction(
        make_study(study_id, patient=f"Patient/{patient}"),
        analysis,
        make_heatmaps(analysis),
        image_sha256=IMAGE_SHA256,
        recorded=recorded,
    )
    refs, out = {}, []
    for i, entry in enumerate(bundle["entry"]):
        res = copy.deepcopy(entry["resource"])
        res["id"] = f"{study_id}-{i}"
        refs[entry["fullUrl"]] = f"{res['resourceType']}/{res['id']}"
        out.append(res)
    text = json.dumps(out)
    for urn, ref in refs.items():
        text = text.replace(f'"{urn}"', f'"{ref}"')
    resources: list[Resource] = json.loads(text)
    return resources


def _response(request: requests.PreparedRequest, status: int, body: Any) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = json.dumps(body).encode()
    resp.headers["Content-Type"] = "application/fhir+json"
    resp.url = str(request.url)
    resp.request = request
    return resp


def outcome(text: str) -> Resource:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "forbidden", "diagnostics": text}],
    }


@dataclass
class FakeHapi(BaseAdapter):
    """Pages through its Observations (``_count`` per page, HAPI-style ``_getpages`` links),
    with the Devices they name as ``include`` entries; reads Device/{id}. Records requests."""

    resources: list[Resource]
    include_devices: bool = True
    token: str | None = None
    device_status: int = 200
    extra: Handler | None = None
    next_base: str = FHIR
    seen: list[requests.PreparedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.seen.append(request)
        if self.extra is not None and (answer := self.extra(request)) is not None:
            return _response(request, *answer)
        authorization = request.headers.get("Authorization")
        if self.token is not None and authorization != f"Bearer {self.token}":
            return _response(request, 401, outcome("token missing or expired"))
        parts = urlsplit(str(request.url))
        query = parse_qs(parts.query)
        if parts.path == "/fhir/Observation":
            return _response(request, 200, self.page(0, int(query["_count"][0])))
        if parts.path == "/fhir" and "_getpages" in query:
            offset, count = int(query["_getpagesoffset"][0]), int(query["_count"][0])
            return _response(request, 200, self.page(offset, count))
        if parts.path.startswith("/fhir/Device/"):
            if self.device_status != 200:
                return _response(request, self.device_status, outcome("not allowed"))
            return _response(request, 200, self.device(parts.path.rsplit("/", 1)[1]))
        return _response(request, 404, outcome(f"no route {parts.path}"))

    def close(self) -> None:
        pass

    @property
    def observations(self) -> list[Resource]:
        return [r for r in self.resources if r["resourceType"] == "Observation"]

    def device(self, did: str) -> Resource:
        return next(r for r in self.resources if r["resourceType"] == "Device" and r["id"] == did)

    def page(self, offset: int, count: int) -> Resource:
        matches = self.observations[offset : offset + count]
        entries = [
            {"fullUrl": f"{FHIR}/Observation/{o['id']}", "resource": o, "search": {"mode": "match"}}
            for o in matches
        ]
        if self.include_devices:
            for did in sorted({o["device"]["reference"].split("/")[1] for o in matches}):
                entries.append(
                    {
                        "fullUrl": f"{FHIR}/Device/{did}",
                        "resource": self.device(did),
                        "search": {"mode": "include"},
                    }
                )
        links = [{"relation": "self", "url": f"{FHIR}/Observation"}]
        if offset + count < len(self.observations):
            nxt = f"{self.next_base}?_getpages=p1&_getpagesoffset={offset + count}&_count={count}"
            links.append({"relation": "next", "url": nxt})
        return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}

    def session(self) -> requests.Session:
        s = requests.Session()
        s.mount("http://", self)
        return s

    def paths(self, prefix: str = "") -> list[str]:
        return [str(r.path_url) for r in self.seen if str(r.path_url).startswith(prefix)]


TRAINED = make_analysis()
UNTRAINED = make_analysis(untrained=True)


@pytest.fixture
def two_studies() -> FakeHapi:
    later = RECORDED + timedelta(hours=1)
    return FakeHapi(stored(TRAINED, "s1", "p1") + stored(TRAINED, "s2", "p2", recorded=later))


def test_one_row_per_observation_with_the_builders_numbers(two_studies: FakeHapi) -> None:
    frame = findings_frame(FHIR, page_size=5, session=two_studies.session())
    assert tuple(frame.columns) == COLUMNS
    assert len(frame) == 28
    assert frame.groupby("study").size().to_dict() == {"s1": 14, "s2": 14}
    assert dict(zip(frame["study"], frame["patient"], strict=True)) == {"s1": "p1", "s2": "p2"}
    s1 = frame[frame["study"] == "s1"]
    assert list(s1["finding"]) == list(NIH_FINDINGS)
    for f, (_, row) in zip(TRAINED.findings, s1.iterrows(), strict=True):
        assert row["score"] == pytest.approx(f.calibrated_probability)
        assert row["score_kind"] == score_name(f)
        if f.has_band:
            assert (row["band_low"], row["band_high"]) == pytest.approx((f.band_low, f.band_high))
            assert row["band_kind"] == (
                "tta-spread" if f.band_kind == "tta-spread" else "confidence"
            )
        else:
            assert row["band_kind"] is None and pd.isna(row["band_low"])
        assert row["threshold"] == pytest.approx(f.threshold)
        assert row["flag"] == ("POS" if f.positive else "NEG")
    pneumothorax = s1[s1["finding"] == "Pneumothorax"].iloc[0]
    assert (pneumothorax["finding_system"], pneumothorax["finding_code"]) == (
        "http://snomed.info/sct",
        "36118008",
    )
    infiltration = s1[s1["finding"] == "Infiltration"].iloc[0]
    assert infiltration["finding_code"] == "112121"  # DICOM: no verified SNOMED code
    assert set(frame["model_version"]) == {TRAINED.model_version}
    assert not frame["untrained"].any()
    assert set(frame["status"]) == {"preliminary"}
    assert str(frame["issued"].dtype) == "datetime64[ns, UTC]"
    assert frame["issued"].iloc[0] == pd.Timestamp(RECORDED)
    assert frame["issued"].is_monotonic_increasing
    # 28 rows / 5 per page = 6 pages; model versions came with them, no Device reads.
    assert len(two_studies.paths("/fhir/Observation")) == 1
    assert len(two_studies.paths("/fhir?_getpages")) == 5
    assert two_studies.paths("/fhir/Device") == []


def test_untrained_rows_are_marked_even_without_the_device() -> None:
    fake = FakeHapi(stored(UNTRAINED, "s9", "p9"), include_devices=False, device_status=403)
    frame = findings_frame(FHIR, session=fake.session())
    assert len(frame) == 14
    assert frame["untrained"].all()  # from each Observation's note alone
    assert frame["model_version"].isna().all()
    # One read for the one Device, refused (a patient token), not one per row.
    (device,) = {o["device"]["reference"] for o in fake.observations}
    assert fake.paths("/fhir/Device") == [f"/fhir/{device}"]


def test_device_version_alone_marks_untrained() -> None:
    resources = stored(UNTRAINED, "s8", "p8")
    for r in resources:
        r.pop("note", None)  # say it only in the Device version
    frame = findings_frame(FHIR, session=FakeHapi(resources).session())
    assert frame["untrained"].all()
    assert "untrained" in frame["model_version"].iloc[0]


def test_missing_includes_read_each_device_once(two_studies: FakeHapi) -> None:
    two_studies.include_devices = False
    frame = findings_frame(FHIR, session=two_studies.session())
    assert set(frame["model_version"]) == {TRAINED.model_version}
    assert sorted(two_studies.paths("/fhir/Device")) == ["/fhir/Device/s1-0", "/fhir/Device/s2-0"]


def test_search_parameters() -> None:
    search = findings_search(
        code=["pneumothorax", "60046008"],
        patient="Patient/p1",
        study=["s1", "ImagingStudy/s2"],
        since="2025-01-02T04:00:00+01:00",
        page_size=50,
    )
    path, _, query = search.construct().partition("?")
    assert path == "Observation"
    assert parse_qsl(query) == [
        ("_security", AIAST),
        ("code", f"{NIH}|"),
        ("_count", "50"),
        ("code", f"{NIH}|Pneumothorax,http://snomed.info/sct|60046008"),
        ("subject", "Patient/p1"),
        ("derived-from", "ImagingStudy/s1,ImagingStudy/s2"),
        ("_lastUpdated", "ge2025-01-02T03:00:00.000Z"),
        ("status", "preliminary,final,amended,corrected"),
        ("_include", "Observation:device"),
    ]
    assert "status" not in dict(parse_qsl(findings_search(status=None).construct()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"code": "Pneumonitis"}, "unknown finding 'Pneumonitis'"),
        ({"since": "2025-01-01T00:00:00"}, "has no time zone"),
        ({"since": "yesterday-ish"}, "is not a date-time"),
        ({"patient": "p1&_has=x"}, "is not a Patient id"),
        ({"study": []}, "an empty filter matches nothing"),
        ({"page_size": 0}, "page_size must be 1..1000"),
        ({"limit": 0}, "limit must be at least 1"),
    ],
)
def test_bad_filters_are_input_errors(kwargs: dict[str, Any], message: str) -> None:
    fake = FakeHapi([])
    with pytest.raises(InputError, match=message):
        findings_frame(FHIR, session=fake.session(), **kwargs)


def test_since_and_limit(two_studies: FakeHapi) -> None:
    later = findings_frame(
        FHIR, since=RECORDED + timedelta(minutes=30), session=two_studies.session()
    )
    assert set(later["study"]) == {"s2"}
    few = findings_frame(FHIR, page_size=5, limit=7, session=two_studies.session())
    assert len(few) == 7
    assert len(two_studies.paths("/fhir?_getpages")) == 1  # stopped paging at 10 rows read


def test_empty_result_has_the_columns_and_types() -> None:
    frame = findings_frame(FHIR, session=FakeHapi([]).session())
    assert tuple(frame.columns) == COLUMNS and frame.empty
    assert str(frame["issued"].dtype) == "datetime64[ns, UTC]"
    assert frame["score"].dtype == "float64"


def test_next_link_to_another_host_is_not_followed(two_studies: FakeHapi) -> None:
    two_studies.next_base = "http://elsewhere.test/fhir"
    with pytest.raises(FhirError, match="next-page link leaves"):
        findings_frame(FHIR, page_size=5, session=two_studies.session())


def test_open_server_sends_no_authorization(two_studies: FakeHapi) -> None:
    findings_frame(FHIR, session=two_studies.session())
    assert all("Authorization" not in r.headers for r in two_studies.seen)


def test_bearer_token_is_sent_and_a_refusal_says_why(two_studies: FakeHapi) -> None:
    two_studies.token = "abc"
    frame = findings_frame(FHIR, auth=BearerToken("abc"), session=two_studies.session())
    assert len(frame) == 28
    with pytest.raises(FhirError, match="401: error: token missing or expired"):
        findings_frame(FHIR, auth=BearerToken("stale"), session=two_studies.session())
    assert "stale" not in repr(BearerToken("stale"))


def test_server_errors_are_unavailable(two_studies: FakeHapi) -> None:
    two_studies.extra = lambda r: (503, outcome("HAPI is starting"))
    with pytest.raises(FhirUnavailableError, match="503: error: HAPI is starting"):
        findings_frame(FHIR, session=two_studies.session())


# --- SMART ---------------------------------------------------------------------------------


def smart_config(**overrides: Any) -> Resource:
    return {
        "token_endpoint": TOKEN_URL,
        "authorization_endpoint": f"{AUTH_SERVER}/authorize",
        "grant_types_supported": ["authorization_code", "client_credentials"],
        **overrides,
    }


@dataclass
class TokenServer:
    """A ``.well-known`` document and a token endpoint; checks and records what it is sent."""

    config: Resource = field(default_factory=smart_config)
    check: Callable[[dict[str, str], requests.PreparedRequest], None] = lambda form, req: None
    forms: list[dict[str, str]] = field(default_factory=list)

    def __call__(self, request: requests.PreparedRequest) -> tuple[int, Any] | None:
        if str(request.url) == f"{FHIR}/.well-known/smart-configuration":
            return 200, self.config
        if str(request.url) == TOKEN_URL:
            body = request.body.decode() if isinstance(request.body, bytes) else request.body
            form = dict(parse_qsl(body or ""))
            self.check(form, request)
            self.forms.append(form)
            return 200, {"access_token": f"token-{len(self.forms)}", "expires_in": 300}
        return None


def test_backend_services_signs_a_client_assertion(two_studies: FakeHapi) -> None:
    key = RSAKey.generate_key(2048, private=True)
    public = RSAKey.import_key(key.as_pem(private=False))

    def check(form: dict[str, str], request: requests.PreparedRequest) -> None:
        assert form["grant_type"] == "client_credentials"
        assert form["scope"] == "system/Observation.rs system/Device.rs"
        assert form["client_assertion_type"].endswith(":client-assertion-type:jwt-bearer")
        token = jwt.decode(form["client_assertion"], public, algorithms=["RS384"])
        assert token.header == {"alg": "RS384", "typ": "JWT", "kid": "k1"}
        claims = token.claims
        assert (claims["iss"], claims["sub"], claims["aud"]) == ("analyst", "analyst", TOKEN_URL)
        assert 0 < claims["exp"] - claims["iat"] <= 300

    tokens = TokenServer(check=check)
    two_studies.extra, two_studies.token = tokens, "token-1"
    auth = BackendServices("analyst", key.as_pem(private=True), key_id="k1")
    assert "PRIVATE" not in repr(auth)
    frame = findings_frame(FHIR, auth=auth, session=two_studies.session())
    assert len(frame) == 28 and len(tokens.forms) == 1

    # The server expires the token mid-paging: one fresh assertion, one retry, on we go.
    def expire_after_first_page(request: requests.PreparedRequest) -> tuple[int, Any] | None:
        if "_getpages" in str(request.url) and two_studies.token == "token-2":
            two_studies.token = "token-3"
        return tokens(request)

    two_studies.extra, two_studies.token = expire_after_first_page, "token-2"
    frame = findings_frame(FHIR, auth=auth, page_size=10, session=two_studies.session())
    assert len(frame) == 28 and len(tokens.forms) == 3
    assert tokens.forms[1]["client_assertion"] != tokens.forms[2]["client_assertion"]


def test_backend_services_with_an_ec_key(two_studies: FakeHapi) -> None:
    key = ECKey.generate_key("P-384", private=True)
    seen: list[str] = []
    tokens = TokenServer(check=lambda form, _: seen.append(form["client_assertion"]))
    two_studies.extra, two_studies.token = tokens, "token-1"
    auth = BackendServices("analyst", key.as_pem(private=True), "k2", algorithm="ES384")
    assert len(findings_frame(FHIR, auth=auth, session=two_studies.session())) == 28
    public = ECKey.import_key(key.as_pem(private=False))
    assert jwt.decode(seen[0], public, algorithms=["ES384"]).header["alg"] == "ES384"
    wrong = BackendServices("analyst", key.as_pem(private=True), "k2", algorithm="RS384")
    with pytest.raises(ConfigError, match="cannot sign a RS384 client assertion"):
        findings_frame(FHIR, auth=wrong, session=two_studies.session())


def test_client_credentials_need_a_server_that_offers_them(two_studies: FakeHapi) -> None:
    two_studies.extra = TokenServer(
        config=smart_config(grant_types_supported=["authorization_code"])
    )
    with pytest.raises(ConfigError, match="does not offer client_credentials"):
        findings_frame(FHIR, auth=ClientSecret("a", "s"), session=two_studies.session())
    two_studies.extra = TokenServer(config=smart_config(token_endpoint=None))
    with pytest.raises(ConfigError, match="has no token_endpoint"):
        findings_frame(FHIR, auth=ClientSecret("a", "s"), session=two_studies.session())
    two_studies.extra = None  # no .well-known at all: 404
    with pytest.raises(ConfigError, match="publishes no SMART configuration"):
        findings_frame(FHIR, auth=ClientSecret("a", "s"), session=two_studies.session())


def test_client_secret_uses_http_basic(two_studies: FakeHapi) -> None:
    def check(form: dict[str, str], request: requests.PreparedRequest) -> None:
        expected = "Basic " + base64.b64encode(b"reporting:s3cret").decode()
        assert request.headers["Authorization"] == expected
        assert form["grant_type"] == "client_credentials" and "client_assertion" not in form

    two_studies.extra, two_studies.token = TokenServer(check=check), "token-1"
    auth = ClientSecret("reporting", "s3cret", scope="system/Observation.rs")
    assert len(findings_frame(FHIR, auth=auth, session=two_studies.session())) == 28


def test_standalone_launch_pkce_state_and_code_exchange(two_studies: FakeHapi) -> None:
    def check(form: dict[str, str], request: requests.PreparedRequest) -> None:
        assert form["grant_type"] == "authorization_code" and form["code"] == "c0de"
        assert form["redirect_uri"] == "http://analyst.test/cb"
        assert form["client_id"] == "notebook" and "Authorization" not in request.headers
        verifier = form["code_verifier"].encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest())
        assert digest.rstrip(b"=").decode() == sent["code_challenge"]

    two_studies.extra, two_studies.token = TokenServer(check=check), "token-1"
    launch = StandaloneLaunch(
        FHIR, client_id="notebook", redirect_uri="http://analyst.test/cb",
        session=two_studies.session(),
    )  # fmt: skip
    url = launch.authorize_url
    assert url.startswith(f"{AUTH_SERVER}/authorize?")
    sent = dict(parse_qsl(urlsplit(url).query))
    assert sent["code_challenge_method"] == "S256" and sent["aud"] == FHIR
    assert sent["scope"] == "openid fhirUser user/Observation.rs user/Device.rs"
    with pytest.raises(InputError, match="not finished"):
        findings_frame(FHIR, auth=launch)
    with pytest.raises(InputError, match="Invalid state"):
        launch.finish("http://analyst.test/cb?code=c0de&state=forged")
    launch.finish(f"http://analyst.test/cb?code=c0de&state={sent['state']}")
    assert len(findings_frame(FHIR, auth=launch)) == 28
    with pytest.raises(InputError, match="the launch was for"):
        findings_frame("http://other.test/fhir", auth=launch)


def test_a_refused_token_request_says_why(two_studies: FakeHapi) -> None:
    tokens = TokenServer()

    def refuse(request: requests.PreparedRequest) -> tuple[int, Any] | None:
        if str(request.url) == TOKEN_URL:
            return 400, {"error": "invalid_client", "error_description": "unknown key k9"}
        return tokens(request)

    two_studies.extra = refuse
    with pytest.raises(FhirError, match=r"refused \(400\).*unknown key k9"):
        findings_frame(FHIR, auth=ClientSecret("a", "s"), session=two_studies.session())
    two_studies.extra = lambda r: (502, {}) if str(r.url) == TOKEN_URL else tokens(r)
    with pytest.raises(FhirUnavailableError, match=r"refused \(502\)"):
        findings_frame(FHIR, auth=ClientSecret("a", "s"), session=two_studies.session())


@pytest.mark.parametrize("base", ["ftp://fhir.test/fhir", "fhir.test/fhir", "http://a/b"])
def test_bad_base_urls_are_input_errors(base: str) -> None:
    with pytest.raises(InputError, match="base"):
        findings_frame(base, session=FakeHapi([]).session())
