"""What the vector store stores and answers, checked: records, filters, hits, and the store
Protocol that :class:`vector_store.store.VectorStore` and the in-memory fake both satisfy.

No database here: the checks run before any SQL, so a bad vector or filter is refused with
the same message by either store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, get_args

import numpy as np
import numpy.typing as npt

from cxr_errors import InputError
from vector_store.migrate import SPACES, Space

__all__ = [
    "DEFAULT_EF_SEARCH",
    "EF_SEARCH_RANGE",
    "GENDERS",
    "MAX_K",
    "EmbeddingRecord",
    "EmbeddingStore",
    "Hit",
    "SearchFilters",
    "Space",
    "Vector",
    "check_text",
    "checked_space",
    "score_of",
    "validate_query",
]

#: HNSW search beam. With m=16 / ef_construction=128 on halfvec, 100 gives recall@10 >= 0.99 on
#: the 112k synthetic set at ~1-2 ms, several times faster than numpy brute force
#: (bench/similar.py prints both; notes: 0.998 at 112k for vector).
DEFAULT_EF_SEARCH = 100


#: Largest k a search may ask for ($similar `count`).
MAX_K = 100


#: pgvector's own bounds for hnsw.ef_search.
EF_SEARCH_RANGE = (1, 1000)


#: FHIR AdministrativeGender (the filter values of $similar `gender`).
GENDERS = frozenset({"male", "female", "other", "unknown"})


_MAX_TEXT = 256


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


_FLOAT16_MAX = float(np.finfo(np.float16).max)


Vector = npt.NDArray[np.float32]


def check_text(name: str, value: str | None, *, required: bool = False) -> None:
    """InputError unless ``value`` is None (when allowed) or a non-empty, bounded string."""
    if value is None:
        if required:
            raise InputError(f"{name} is required")
        return
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_TEXT:
        raise InputError(f"{name} is longer than {_MAX_TEXT} characters")


def checked_space(space: str) -> Space:
    if space not in get_args(Space):
        raise InputError(f"unknown space {space!r}; expected one of {sorted(SPACES)}")
    return space  # type: ignore[return-value]


def _as_unit_vector(name: str, value: Any, dimensions: int) -> Vector:
    """``value`` as a read-only float32 unit vector, or InputError saying what is wrong."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} is not a numeric vector: {exc}") from None
    if array.ndim != 1 or array.shape[0] != dimensions:
        raise InputError(
            f"{name} must have {dimensions} dimensions, got shape {tuple(array.shape)}"
        )
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite values")
    norm = float(np.linalg.norm(array))
    # Cosine is undefined for the zero vector, and pgvector leaves such rows out of the index.
    if norm == 0.0 or not math.isfinite(norm):
        raise InputError(f"{name} has zero length; cosine similarity is undefined for it")
    unit = (array / norm).astype(np.float32)
    unit.setflags(write=False)
    return unit


@dataclass(frozen=True, eq=False)
class EmbeddingRecord:
    """The embeddings of one study under one model version, with its filter columns.

    Vectors are normalised to unit length on construction (cosine ignores length, and unit
    vectors can never overflow float16); what :meth:`VectorStore.get` returns is that vector
    rounded to float16. ``created_at`` / ``updated_at`` are set by the store and ignored on
    upsert. Compared by identity: arrays have no single truth value.
    """

    study_id: str
    model_version: str
    study_version_id: str
    clip: Vector | None = field(default=None, repr=False)
    densenet: Vector | None = field(default=None, repr=False)
    patient_id: str | None = None
    gender: str | None = None
    age: int | None = None
    view_position: str | None = None
    positive_findings: tuple[str, ...] = ()
    image_sha256: str | None = None
    clip_version: str | None = None
    """the CLIP model that made ``clip``; None = unknown (rows from before it was recorded),
    which a clip-space search never returns"""
    created_at: datetime | None = field(default=None, repr=False)
    updated_at: datetime | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_text("study_id", self.study_id, required=True)
        check_text("model_version", self.model_version, required=True)
        check_text("study_version_id", self.study_version_id, required=True)
        check_text("patient_id", self.patient_id)
        check_text("view_position", self.view_position)
        check_text("clip_version", self.clip_version)
        if self.clip_version is not None and self.clip is None:
            raise InputError(f"study {self.study_id}: a clip_version needs a clip vector")
        if self.clip is None and self.densenet is None:
            raise InputError(f"study {self.study_id}: a record needs a clip or densenet vector")
        for attr, space in (("clip", "clip"), ("densenet", "densenet")):
            value = getattr(self, attr)
            if value is not None:
                dims = SPACES[space].dimensions  # type: ignore[index]
                object.__setattr__(self, attr, _as_unit_vector(f"{attr} vector", value, dims))
        if self.gender is not None and self.gender not in GENDERS:
            raise InputError(f"gender must be one of {sorted(GENDERS)}, got {self.gender!r}")
        if self.age is not None and (
            isinstance(self.age, bool) or not isinstance(self.age, int) or not 0 <= self.age <= 150
        ):
            raise InputError(f"age must be an integer in 0..150 or None, got {self.age!r}")
        if isinstance(self.positive_findings, str):
            raise InputError("positive_findings must be a sequence of labels, not one string")
        findings = tuple(self.positive_findings)
        for finding in findings:
            check_text("positive finding", finding)
        object.__setattr__(self, "positive_findings", findings)
        if self.image_sha256 is not None and not _SHA256_RE.match(self.image_sha256):
            raise InputError(
                f"image_sha256 must be 64 lowercase hex digits, got {self.image_sha256!r}"
            )

    @property
    def key(self) -> tuple[str, str]:
        return (self.study_id, self.model_version)

    def vector(self, space: Space) -> Vector | None:
        return self.clip if space == "clip" else self.densenet


@dataclass(frozen=True)
class SearchFilters:
    """Row filters of a k-NN search; every field left as None filters nothing.

    ``age_min`` / ``age_max`` are inclusive and drop rows of unknown age; ``exclude_patient``
    keeps rows whose patient is unknown, ``patient`` keeps only that patient's rows (those of
    an unknown patient never); ``finding`` must be among the positive findings
    (exact, case-sensitive label); ``exclude_study`` drops the query study itself.
    """

    exclude_patient: str | None = None
    patient: str | None = None
    gender: str | None = None
    view_position: str | None = None
    age_min: int | None = None
    age_max: int | None = None
    finding: str | None = None
    exclude_study: str | None = None

    def __post_init__(self) -> None:
        for name in ("exclude_patient", "patient", "view_position", "finding", "exclude_study"):
            check_text(name, getattr(self, name))
        if self.gender is not None and self.gender not in GENDERS:
            raise InputError(f"gender must be one of {sorted(GENDERS)}, got {self.gender!r}")
        for name in ("age_min", "age_max"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 150
            ):
                raise InputError(f"{name} must be an integer in 0..150, got {value!r}")
        if self.age_min is not None and self.age_max is not None and self.age_min > self.age_max:
            raise InputError(f"age_min ({self.age_min}) is greater than age_max ({self.age_max})")


@dataclass(frozen=True)
class Hit:
    """One search result; ``score`` is the cosine similarity, clipped to [0, 1]."""

    study_id: str
    patient_id: str | None
    score: float


def validate_query(vector: Any, space: str, k: int, ef_search: int | None) -> tuple[Space, Vector]:
    """Checks shared by every store: returns the space and the query as a unit vector."""
    checked = checked_space(space)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InputError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    low, high = EF_SEARCH_RANGE
    if ef_search is not None and (
        isinstance(ef_search, bool)
        or not isinstance(ef_search, int)
        or not low <= ef_search <= high
    ):
        raise InputError(f"ef_search must be an integer in {low}..{high}, got {ef_search!r}")
    dims = SPACES[checked].dimensions
    return checked, _as_unit_vector(f"query vector for space {checked!r}", vector, dims)


def score_of(distance: float) -> float:
    """Cosine distance -> similarity in [0, 1]; anti-correlated vectors score 0, not < 0."""
    return min(1.0, max(0.0, 1.0 - distance))


class EmbeddingStore(Protocol):
    """What the worker and ``$similar`` need; :class:`VectorStore` and the in-memory fake."""

    def upsert(self, record: EmbeddingRecord) -> None: ...

    def upsert_many(self, records: Iterable[EmbeddingRecord]) -> int: ...

    def get(self, study_id: str, model_version: str) -> EmbeddingRecord | None: ...

    def search(
        self,
        vector: Any,
        *,
        space: Space,
        k: int,
        model_version: str,
        filters: SearchFilters | None = None,
        exact: bool = False,
        ef_search: int | None = None,
        clip_version: str | None = None,
    ) -> list[Hit]: ...

    def count(self, model_version: str | None = None) -> int: ...

    def delete(self, study_id: str) -> int: ...
