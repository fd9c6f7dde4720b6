"""cxr-fhir's AI findings as a pandas DataFrame: one row per AI Observation, read by fhirclient.

What one Observation carries is written by the worker (``builders._observation``): the
finding as SNOMED CT / DICOM codes plus the NIH label, ``valueQuantity`` = the calibrated
probability, ``interpretation`` POS/NEG at the operating threshold, the confidence band as
the AI-transparency ``AIconfidence`` extension, components for the logit, sigmoid score and
threshold, ``derivedFrom`` → ImagingStudy, ``subject`` → Patient, ``device`` → the Device
whose ``version`` is the model version, ``issued``, and, for the untrained test model, a note
saying so. :data:`COLUMNS` lists what the frame keeps of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import pandas as pd
import requests
from fhirclient.models.bundle import Bundle
from fhirclient.models.device import Device
from fhirclient.models.fhirabstractbase import FHIRValidationError
from fhirclient.models.fhirsearch import FHIRSearch, FHIRSearchParam
from fhirclient.models.observation import Observation
from fhirclient.server import (
    FHIRNotFoundException,
    FHIRPermissionDeniedException,
    FHIRUnauthorizedException,
)

from cxr_errors import FhirError, FhirUnavailableError, InputError
from fhir_service.analytics.auth import Auth, Connection, open_connection
from fhir_service.fhir.outcome import outcome_text
from fhir_service.fhir.results import UNTRAINED_NOTE
from fhir_service.fhir.terminology import TERMINOLOGY
from models.types import NIH_FINDINGS

__all__ = ["COLUMNS", "LIVE_STATUSES", "findings_frame", "findings_search", "read_findings"]

log = logging.getLogger(__name__)

#: The frame's columns, in order (see :func:`findings_frame` for what each holds).
COLUMNS = (
    "study",
    "patient",
    "finding",
    "finding_system",
    "finding_code",
    "score",
    "score_kind",
    "band_low",
    "band_high",
    "band_kind",
    "flag",
    "threshold",
    "untrained",
    "model_version",
    "status",
    "issued",
    "observation",
)
_FLOATS = ("score", "band_low", "band_high", "threshold")
#: Results in force: everything but ``cancelled`` (withdrawn for a newer image) and
#: ``entered-in-error``. A radiologist's review turns ``preliminary`` into final/amended.
LIVE_STATUSES = ("preliminary", "final", "amended", "corrected")

_NIH_SYSTEM = TERMINOLOGY.code_system_url("nih_label")
_AIAST = TERMINOLOGY.concept("ai_asserted")
#: The band's extension → what the band is (issue 15: an augmented-view spread is no
#: confidence interval, so it has its own extension).
_BAND_KINDS = {
    TERMINOLOGY.extension_url("ai_confidence"): "confidence",
    TERMINOLOGY.extension_url("tta_spread"): "tta-spread",
}
#: How the Observation's interpretation text names its value (fhir.results.score_name).
_SCORE_KINDS = ("calibrated probability", "uncalibrated score")
_THRESHOLD = TERMINOLOGY.concept("component_threshold")
_INTERPRETATION_SYSTEM = TERMINOLOGY.concept("interpretation_positive")["system"]
_LABELS = {label.lower(): label for label in TERMINOLOGY.findings}
_CODES = {
    c["code"]: f"{c['system']}|{c['code']}"
    for f in TERMINOLOGY.findings.values()
    for c in f.codings
}
_ORDER = {label: i for i, label in enumerate(NIH_FINDINGS)}
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


# --- search parameters ---------------------------------------------------------------------


def _values(value: str | Sequence[str]) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        raise InputError("an empty filter matches nothing; pass None to leave it out")
    return [v.strip() for v in values]


def _code_token(value: str) -> str:
    if "|" in value:
        return value
    if value.lower() in _LABELS:
        return f"{_NIH_SYSTEM}|{_LABELS[value.lower()]}"
    if value in _CODES:
        return _CODES[value]
    raise InputError(
        f"unknown finding {value!r}: give an NIH label ({', '.join(NIH_FINDINGS[:3])}, …), "
        "a code of ours (e.g. 36118008) or system|code"
    )


def _references(kind: str, value: str | Sequence[str]) -> str:
    out = []
    for v in _values(value):
        rid = v.removeprefix(f"{kind}/")
        if not _FHIR_ID.fullmatch(rid):
            raise InputError(f"{v!r} is not a {kind} id (or {kind}/id)")
        out.append(f"{kind}/{rid}")
    return ",".join(out)


def _since(value: datetime | str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"since={value!r} is not a date-time: {exc}") from exc
    if ts.tzinfo is None:
        raise InputError(f"since={value!r} has no time zone; e.g. pd.Timestamp(…, tz='UTC')")
    return ts.tz_convert("UTC")


def findings_search(
    *,
    code: str | Sequence[str] | None = None,
    patient: str | Sequence[str] | None = None,
    study: str | Sequence[str] | None = None,
    since: datetime | str | None = None,
    status: Sequence[str] | None = LIVE_STATUSES,
    page_size: int = 200,
) -> Any:
    """The fhirclient ``FHIRSearch`` for cxr-fhir's AI Observations with these filters."""
    if not 1 <= page_size <= 1000:
        raise InputError(f"page_size must be 1..1000, got {page_size}")
    params = [
        ("_security", f"{_AIAST['system']}|{_AIAST['code']}"),
        # Any code in our NIH-label system: other AI tools' AIAST Observations stay out.
        ("code", f"{_NIH_SYSTEM}|"),
        ("_count", str(page_size)),
    ]
    if code is not None:
        params.append(("code", ",".join(_code_token(v) for v in _values(code))))
    if patient is not None:
        params.append(("subject", _references("Patient", patient)))
    if study is not None:
        params.append(("derived-from", _references("ImagingStudy", study)))
    if since is not None:
        # R4 has no search on Observation.issued; issued ≤ lastUpdated, so this is a superset
        # narrowed to issued ≥ since after reading.
        iso = _since(since).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        params.append(("_lastUpdated", f"ge{iso}"))
    if status is not None:
        params.append(("status", ",".join(_values(status))))
    search = FHIRSearch(Observation)
    search.params = [FHIRSearchParam(name, value) for name, value in params]
    return search.include("device")


# --- paging ----------------------------------------------------------------------------------


def _refusal(exc: Any, what: str) -> FhirError:
    response = getattr(exc, "response", None)
    if response is None:
        return FhirUnavailableError(f"{what} failed: {exc}")
    try:
        detail = outcome_text(response.json())
    except ValueError:
        detail = response.text[:300]
    kind = FhirUnavailableError if response.status_code >= 500 else FhirError
    return kind(f"{what} answered {response.status_code}: {detail}")


def _read(conn: Connection, model: Any, path: str) -> Any:
    """``model.read_from(path)``; one new token and a retry after a 401, when renewable."""
    renewed = False
    while True:
        try:
            return model.read_from(path, conn.server)
        except FHIRUnauthorizedException as exc:
            if renewed or conn.renew is None or not conn.renew():
                raise _refusal(exc, f"GET {path}") from exc
            renewed = True
        except (FHIRPermissionDeniedException, FHIRNotFoundException) as exc:
            raise _refusal(exc, f"GET {path}") from exc
        except requests.RequestException as exc:
            raise _refusal(exc, f"GET {path}") from exc
        except FHIRValidationError as exc:
            raise FhirError(f"GET {path}: not a valid R4 {model.resource_type}: {exc}") from exc


def _next_url(bundle: Any, base: str) -> str | None:
    url = next((link.url for link in bundle.link or [] if link.relation == "next"), None)
    if url is None:
        return None
    absolute = urljoin(base + "/", str(url))
    # The next page gets our Authorization header: it must come from the server we asked.
    ours, theirs = urlsplit(base), urlsplit(absolute)
    if (ours.scheme, ours.netloc) != (theirs.scheme, theirs.netloc):
        raise FhirError(f"the next-page link leaves {base} ({absolute}); not following it")
    return absolute


def _pages(conn: Connection, path: str) -> Iterator[Any]:
    url: str | None = path
    while url is not None:
        bundle = _read(conn, Bundle, url)
        yield bundle
        url = _next_url(bundle, conn.base_url)


# --- rows ------------------------------------------------------------------------------------


def _ref_id(ref: Any, kind: str) -> str | None:
    reference = str(getattr(ref, "reference", None) or "")
    m = re.search(rf"(?:^|/){kind}/([A-Za-z0-9\-.]{{1,64}})(?:/_history/[^/]+)?$", reference)
    return m.group(1) if m else None


def _number(quantity: Any) -> float | None:
    value = getattr(quantity, "value", None)
    return None if value is None else float(value)


def _band(obs: Any) -> tuple[float | None, float | None, str | None]:
    for ext in obs.extension or []:
        kind = _BAND_KINDS.get(ext.url)
        if kind is not None and ext.valueRange is not None:
            return _number(ext.valueRange.low), _number(ext.valueRange.high), kind
    return None, None, None


def _score_kind(obs: Any) -> str | None:
    """'calibrated probability' or 'uncalibrated score', as the interpretation names it."""
    for concept in obs.interpretation or []:
        text = concept.text or ""
        for kind in _SCORE_KINDS:
            if text.startswith(kind):
                return kind
    return None


def _threshold(obs: Any) -> float | None:
    for comp in obs.component or []:
        codings = comp.code.coding or [] if comp.code else []
        if any(c.system == _THRESHOLD["system"] and c.code == _THRESHOLD["code"] for c in codings):
            return _number(comp.valueQuantity)
    return None


def _flag(obs: Any) -> str | None:
    for concept in obs.interpretation or []:
        for c in concept.coding or []:
            if c.system == _INTERPRETATION_SYSTEM:
                return str(c.code)
    return None


def _row(obs: Any) -> dict[str, Any]:
    codings = (obs.code.coding or []) if obs.code else []
    standard = next((c for c in codings if c.system != _NIH_SYSTEM), None)
    studies = (_ref_id(r, "ImagingStudy") for r in obs.derivedFrom or [])
    low, high, band_kind = _band(obs)
    return {
        "study": next((s for s in studies if s), None),
        "patient": _ref_id(obs.subject, "Patient"),
        "finding": next((c.code for c in codings if c.system == _NIH_SYSTEM), None),
        "finding_system": standard.system if standard else None,
        "finding_code": standard.code if standard else None,
        "score": _number(obs.valueQuantity),
        "score_kind": _score_kind(obs),
        "band_low": low,
        "band_high": high,
        "band_kind": band_kind,
        "flag": _flag(obs),
        "threshold": _threshold(obs),
        "untrained": any(n.text == UNTRAINED_NOTE for n in obs.note or []),
        "status": obs.status,
        "issued": obs.issued.as_json() if obs.issued else None,
        "observation": obs.id,
        "device": _ref_id(obs.device, "Device"),
    }


def _version(device: Any) -> str | None:
    versions = [v.value for v in device.version or [] if v.value]
    return str(versions[0]) if versions else None


def _missing_devices(conn: Connection, ids: set[str], versions: dict[str, str | None]) -> None:
    for did in sorted(ids - versions.keys()):
        try:
            versions[did] = _version(_read(conn, Device, f"Device/{did}"))
        except FhirError as exc:
            # e.g. a patient-scoped token: Devices are outside the patient compartment.
            log.warning("model version unknown for Device/%s: %s", did, exc)
            versions[did] = None


# --- the frame -------------------------------------------------------------------------------


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=[*COLUMNS, "device"])
    frame = frame.drop(columns="device")
    for name in _FLOATS:
        frame[name] = frame[name].astype("float64")
    frame["untrained"] = frame["untrained"].astype(bool)
    # pandas 3 would infer microseconds; one resolution whatever the pandas version.
    issued = pd.to_datetime(frame["issued"], utc=True, format="ISO8601")
    frame["issued"] = issued.astype("datetime64[ns, UTC]")
    order = frame["finding"].map(_ORDER)
    frame = frame.assign(_order=order).sort_values(["issued", "study", "_order"], kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def read_findings(
    conn: Connection, search: Any, *, since: datetime | str | None = None, limit: int | None = None
) -> pd.DataFrame:
    """Page through ``search`` on ``conn`` (see :func:`findings_frame`)."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    since_ts = None if since is None else _since(since)
    rows: list[dict[str, Any]] = []
    versions: dict[str, str | None] = {}
    for bundle in _pages(conn, search.construct()):
        for entry in bundle.entry or []:
            res = entry.resource
            mode = entry.search.mode if entry.search else "match"
            if res is not None and res.resource_type == "Device":
                versions[str(res.id)] = _version(res)
            elif res is not None and res.resource_type == "Observation" and mode == "match":
                row = _row(res)
                if since_ts is None or pd.Timestamp(row["issued"]) >= since_ts:
                    rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    rows = rows[:limit]
    _missing_devices(conn, {r["device"] for r in rows if r["device"]}, versions)
    for r in rows:
        r["model_version"] = versions.get(r["device"]) if r["device"] else None
        r["untrained"] = r["untrained"] or "untrained" in (r["model_version"] or "").lower()
    frame = _frame(rows)
    if frame["untrained"].any():
        log.warning(
            "%d of %d rows are UNTRAINED model output — not findings",
            int(frame["untrained"].sum()),
            len(frame),
        )
    return frame


def findings_frame(
    base_url: str,
    *,
    code: str | Sequence[str] | None = None,
    patient: str | Sequence[str] | None = None,
    study: str | Sequence[str] | None = None,
    since: datetime | str | None = None,
    status: Sequence[str] | None = LIVE_STATUSES,
    auth: Auth | None = None,
    page_size: int = 200,
    limit: int | None = None,
    session: requests.Session | None = None,
    timeout_s: float = 60.0,
) -> pd.DataFrame:
    """cxr-fhir's AI findings on ``base_url`` as a DataFrame, one row per AI Observation.

    Reads ``Observation?_security=…|AIAST&code=<NIH label system>|&_include=Observation:device``
    with fhirclient, following ``next`` links (same host only) to the end or to ``limit``
    rows; each model version is read once (from the included Devices).

    Filters, each one value or a list (OR), AND-ed together: ``code`` — NIH label (any
    case), one of our codes (``"36118008"``) or ``"system|code"``; ``patient`` — ``"123"``
    or ``"Patient/123"``; ``study`` — ImagingStudy id (``derived-from``); ``since`` —
    tz-aware, rows issued at or after it (``_lastUpdated=ge`` on the server, then ``issued``
    here: R4 cannot search ``Observation.issued``); ``status`` — default
    :data:`LIVE_STATUSES` (no results cancelled by a newer image), ``None`` for all.

    ``auth``: ``None`` (open server), :class:`BearerToken`, :class:`BackendServices`,
    :class:`ClientSecret` or a finished :class:`StandaloneLaunch` (see
    :mod:`fhir_service.analytics.auth`). ``session``: a ``requests.Session`` to send through
    (proxies, CA bundles; its own timeouts apply).

    Columns (:data:`COLUMNS`): ``study``/``patient`` ids; ``finding`` (NIH label);
    ``finding_system``/``finding_code`` (SNOMED CT; DICOM 112121 for Infiltration);
    ``score`` = ``valueQuantity`` and ``score_kind`` what it is: ``calibrated probability``
    where a calibration was fitted for the finding, else ``uncalibrated score`` (the sigmoid
    of the logit, not a probability); ``band_low``/``band_high`` and ``band_kind``
    (``confidence``: the AIconfidence range; ``tta-spread``: the spread over augmented views,
    not a confidence interval; empty where no band was computed); ``flag`` POS/NEG at
    ``threshold``; ``untrained`` — True for the untrained test
    model, **not a finding**; ``model_version`` (Device.version; missing if the Device is
    unreadable); ``status`` (preliminary, final/amended once reviewed); ``issued``
    (datetime64[ns, UTC]); ``observation`` id. Ordered by issued, study, NIH finding order.

    Raises ``InputError`` (bad filters), ``FhirError`` (a refusal, with the server's
    reason), ``FhirUnavailableError`` (timeouts, 5xx), ``ConfigError`` (an auth the server
    cannot do).
    """
    search = findings_search(
        code=code, patient=patient, study=study, since=since, status=status, page_size=page_size
    )
    conn = open_connection(base_url, auth, session=session, timeout_s=timeout_s)
    return read_findings(conn, search, since=since, limit=limit)
