"""The ``$similar`` operation: parameters, query embedding, k-NN, and the searchset Bundle.

Framework-free so that the HTTP routes, the CLI and the tests share one implementation.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from cxr_errors import ForbiddenError, InputError
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.terminology import TERMINOLOGY, finding_label
from subscriptions.lifecycle import WITHDRAWN_STATUSES
from vector_store.records import MAX_K, EmbeddingStore, SearchFilters

MAX_TEXT = 1000
DEFAULT_COUNT = 10
_GENDERS = {"male", "female", "other", "unknown"}
_VIEWS = {"PA", "AP", "LL"}
_IMAGE_TYPES = ("image/png", "image/jpeg", "application/dicom")


class Unprocessable(InputError):
    """The study exists but has no embedding to search with."""

    http_status = 422
    issue_code = "processing"


class QueryEncoder(Protocol):
    """Embeds a query that is not a stored study (text or an image)."""

    def text(self, text: str) -> npt.NDArray[np.float32]: ...

    def image(self, data: bytes, space: str) -> npt.NDArray[np.float32]: ...

    def clip_version(self) -> str:
        """The version of the CLIP model that embeds text and image queries."""
        ...


@dataclass(frozen=True)
class SimilarQuery:
    study_id: str | None
    text: str | None
    image: bytes | None
    count: int
    space: Literal["clip", "densenet"]
    exclude_same_patient: bool
    #: Only this patient's studies (a patient launch, or a patient-scoped token).
    patient: str | None
    gender: str | None
    view_position: str | None
    age_min: int | None
    age_max: int | None
    finding: str | None


def _finding_label(token: str) -> str:
    """Accept the NIH label (any case), a code (SNOMED/DCM/RadLex) or ``system|code``."""
    label = finding_label(token)
    if label is None:
        known = ", ".join(TERMINOLOGY.findings)
        raise InputError(f"unknown finding {token!r}; use one of {known} or one of their codes")
    return label


def _int(name: str, raw: str | None, lo: int, hi: int) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise InputError(f"{name} must be an integer, got {raw!r}") from exc
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_PATIENT_ID = re.compile(r"(?:Patient/)?(?P<id>[A-Za-z0-9\-.]{1,64})")


def patient_id(raw: str | None) -> str | None:
    """``patient``: a Patient id, or ``Patient/{id}`` (a reference, as FHIR searches take)."""
    if raw is None or raw == "":
        return None
    m = _PATIENT_ID.fullmatch(raw)
    if m is None or m.group("id").strip(".") == "":
        raise InputError(f"patient must be a Patient id or Patient/{{id}}, got {raw!r}")
    return m.group("id")


def _bool(name: str, raw: str | None) -> bool:
    if raw is None or raw == "":
        return False
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise InputError(f"{name} must be true or false, got {raw!r}")


def params_from_resource(body: Any) -> tuple[dict[str, str], bytes | None, str]:
    """Flatten a ``Parameters`` body: primitive values as strings, plus the image attachment.
    Anything else (not an object, a parameter that is not one, a repeated name, a value that
    is not primitive) is an InputError."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InputError("the POST body must be a FHIR Parameters resource")
    parameters = body.get("parameter", [])
    if not isinstance(parameters, list):
        raise InputError("Parameters.parameter must be a list")
    flat: dict[str, str] = {}
    image: bytes | None = None
    image_type = ""
    for p in parameters:
        name = p.get("name") if isinstance(p, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError("each Parameters.parameter must be an object with a name")
        if name in flat or (name == "image" and image is not None):
            raise InputError(f"parameter {name!r} is given more than once")
        if name == "image":
            image, image_type = _image_parameter(p)
            continue
        values = [v for k, v in p.items() if k.startswith("value")]
        if len(values) != 1 or isinstance(values[0], dict | list) or values[0] is None:
            raise InputError(f"parameter {name!r} must have one primitive value")
        flat[name] = str(values[0]).lower() if isinstance(values[0], bool) else str(values[0])
    return flat, image, image_type


def check_image_type(image_type: str) -> None:
    """An image parameter's contentType, when given, must be one the model reads."""
    if image_type and not image_type.startswith(_IMAGE_TYPES):
        raise InputError(f"image contentType {image_type!r} is not one of {_IMAGE_TYPES}")


def _image_parameter(p: Mapping[str, Any]) -> tuple[bytes, str]:
    att = p.get("valueAttachment")
    if not isinstance(att, dict) or not isinstance(att.get("data"), str) or not att["data"]:
        raise InputError("parameter 'image' must be an Attachment with inline data")
    try:
        image = base64.b64decode(att["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image data is not valid base64: {exc}") from exc
    return image, str(att.get("contentType", ""))


def parse_query(
    params: Mapping[str, str],
    *,
    study_id: str | None = None,
    image: bytes | None = None,
    image_type: str = "",
) -> SimilarQuery:
    allowed = {
        "count", "space", "exclude-same-patient", "gender", "view-position",
        "age-min", "age-max", "finding", "text", "patient",
    }  # fmt: skip
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(unknown)}; allowed: {sorted(allowed)}")
    count = _int("count", params.get("count"), 1, MAX_K) or DEFAULT_COUNT
    space = params.get("space") or "clip"
    if space not in ("clip", "densenet"):
        raise InputError(f"space must be 'clip' or 'densenet', got {space!r}")
    text = params.get("text")
    if text is not None:
        text = text.strip()
        if not text:
            raise InputError("text must not be empty")
        if len(text) > MAX_TEXT:
            raise InputError(f"text is {len(text)} characters; the limit is {MAX_TEXT}")
        if space != "clip":
            raise InputError("a text query needs space=clip (DenseNet features have no text)")
    if image is not None:
        check_image_type(image_type)
    if study_id is not None and (not _FHIR_ID.fullmatch(study_id) or not study_id.strip(".")):
        raise InputError(f"{study_id!r} is not a FHIR resource id")
    given = sum(x is not None for x in (study_id, text, image))
    if given != 1:
        raise InputError("give exactly one of: a study (instance level), text, or image")
    gender = params.get("gender") or None
    if gender is not None and gender not in _GENDERS:
        raise InputError(f"gender must be one of {sorted(_GENDERS)}, got {gender!r}")
    view = params.get("view-position") or None
    if view is not None and view.upper() not in _VIEWS:
        raise InputError(f"view-position must be one of {sorted(_VIEWS)}, got {view!r}")
    age_min = _int("age-min", params.get("age-min"), 0, 150)
    age_max = _int("age-max", params.get("age-max"), 0, 150)
    if age_min is not None and age_max is not None and age_min > age_max:
        raise InputError(f"age-min {age_min} is greater than age-max {age_max}")
    finding = params.get("finding")
    return SimilarQuery(
        study_id=study_id,
        text=text,
        image=image,
        count=count,
        space=space,  # type: ignore[arg-type]
        exclude_same_patient=_bool("exclude-same-patient", params.get("exclude-same-patient")),
        patient=patient_id(params.get("patient")),
        gender=gender,
        view_position=view.upper() if view else None,
        age_min=age_min,
        age_max=age_max,
        finding=_finding_label(finding) if finding else None,
    )


@dataclass
class SimilarService:
    fhir: FhirClient
    store: EmbeddingStore
    model_version: str
    encoder: QueryEncoder
    """loads its models on first use (``runtime.ModelQueryEncoder``): a study query needs none"""

    def run(
        self, q: SimilarQuery, base_url: str, *, bound_patient: str | None = None
    ) -> dict[str, Any]:
        """The searchset for ``q``. ``bound_patient`` (a patient-context caller) limits
        everything to that patient: the query study must be theirs and so is every match."""
        if bound_patient is not None:
            if q.patient not in (None, bound_patient):
                raise ForbiddenError(f"this token may search Patient/{bound_patient} only")
            q = replace(q, patient=bound_patient)
        vector, exclude_patient, clip_version = self._query_vector(q, bound_patient)
        filters = SearchFilters(
            exclude_patient=exclude_patient,
            patient=q.patient,
            exclude_study=q.study_id,
            gender=q.gender,
            view_position=q.view_position,
            age_min=q.age_min,
            age_max=q.age_max,
            finding=q.finding,
        )
        hits = self.store.search(
            vector,
            space=q.space,
            k=q.count,
            model_version=self.model_version,
            filters=filters,
            clip_version=clip_version,
        )
        bundle = self._bundle([(h.study_id, h.score) for h in hits], base_url, q.patient)
        made_by = (clip_version or "") if q.space == "clip" else self.model_version
        if "untrained" in made_by.lower():
            # An untrained model's ranking is noise: say so on the answer itself.
            bundle["meta"] = {"tag": [TERMINOLOGY.concept("untrained_model")]}
        return bundle

    @staticmethod
    def _known_clip_version(study_id: str, version: str | None) -> str:
        """The query study's CLIP version: its neighbours must share it."""
        if version is None:
            raise Unprocessable(
                f"ImagingStudy/{study_id}'s CLIP embedding was stored without its CLIP version, "
                "so it cannot be compared safely; re-process the study (or use space=densenet)"
            )
        return version

    def _query_vector(
        self, q: SimilarQuery, bound_patient: str | None
    ) -> tuple[npt.NDArray[np.float32], str | None, str | None]:
        """The query's embedding, the patient to leave out (``exclude-same-patient``) and,
        in clip space, the CLIP version its neighbours must share."""
        clip_space = q.space == "clip"
        if q.study_id is None:
            encoder = self.encoder
            if q.text is not None:  # text is embedded by CLIP only
                return encoder.text(q.text), None, encoder.clip_version()
            assert q.image is not None
            clip_version = encoder.clip_version() if clip_space else None
            return encoder.image(q.image, q.space), None, clip_version
        study = self.fhir.read("ImagingStudy", q.study_id)  # NotFoundError → 404
        subject = _subject_id(study)
        if bound_patient is not None and subject != bound_patient:
            raise ForbiddenError(f"ImagingStudy/{q.study_id} is not Patient/{bound_patient}'s")
        if study.get("status") in WITHDRAWN_STATUSES:
            raise Unprocessable(
                f"ImagingStudy/{q.study_id} is {study['status']}: a withdrawn study is neither "
                "searched from nor offered as a similar case"
            )
        record = self.store.get(q.study_id, self.model_version)
        vector = record.vector(q.space) if record is not None else None
        if vector is None:
            raise Unprocessable(
                f"ImagingStudy/{q.study_id} has no {q.space} embedding for model "
                f"{self.model_version} (not processed yet, or processing failed)"
            )
        assert record is not None
        clip_version = None
        if clip_space:
            clip_version = self._known_clip_version(q.study_id, record.clip_version)
        return vector, (subject if q.exclude_same_patient else None), clip_version

    def _bundle(
        self, hits: Sequence[tuple[str, float]], base_url: str, patient: str | None
    ) -> dict[str, Any]:
        studies: dict[str, dict[str, Any]] = {}
        if hits:
            ids = ",".join(sid for sid, _ in hits)
            found = self.fhir.search("ImagingStudy", {"_id": ids, "_count": str(len(hits))})
            for entry in found.get("entry", []):
                study = entry["resource"]
                # The index could be stale (its patient; a study withdrawn since, whose job
                # has not yet taken it out): the study as it is now decides.
                if study.get("status") in WITHDRAWN_STATUSES:
                    continue
                if patient is None or _subject_id(study) == patient:
                    studies[study["id"]] = study
        entries = [
            {
                "fullUrl": f"{base_url}/ImagingStudy/{sid}",
                "resource": studies[sid],
                "search": {"mode": "match", "score": round(score, 6)},
            }
            for sid, score in hits
            if sid in studies  # a study deleted from HAPI since it was embedded
        ]
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(entries),
            "entry": entries,
        }


def _subject_id(study: Mapping[str, Any]) -> str | None:
    ref = (study.get("subject") or {}).get("reference", "")
    m = re.fullmatch(r"(?:.*/)?Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?", str(ref))
    return m.group(1) if m else None
