"""An in-memory :class:`~vector_store.store.EmbeddingStore` for unit tests of higher layers.

Same validation, filters, ordering and scores as :class:`~vector_store.store.VectorStore`: it
keeps vectors rounded to float16 as the ``halfvec`` columns do, and always answers exactly by
brute force (``exact`` and ``ef_search`` are validated, then need no effect).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from vector_store.records import (
    DEFAULT_EF_SEARCH,
    EmbeddingRecord,
    Hit,
    SearchFilters,
    Space,
    check_text,
    score_of,
    validate_query,
)

__all__ = ["InMemoryVectorStore"]


def _as_stored(record: EmbeddingRecord, created_at: datetime, now: datetime) -> EmbeddingRecord:
    """``record`` as the database would return it: float16 vectors, store-set timestamps."""

    def half(vector: Any) -> Any:
        return None if vector is None else vector.astype(np.float16).astype(np.float32)

    return replace(
        record,
        clip=half(record.clip),
        densenet=half(record.densenet),
        created_at=created_at,
        updated_at=now,
    )


def _passes(record: EmbeddingRecord, filters: SearchFilters) -> bool:
    """SQL semantics of the filters in store.search_sql: NULL never compares true, except
    ``exclude_patient``, which is ``IS DISTINCT FROM``."""
    if filters.exclude_patient is not None and record.patient_id == filters.exclude_patient:
        return False
    if filters.patient is not None and record.patient_id != filters.patient:
        return False
    if filters.exclude_study is not None and record.study_id == filters.exclude_study:
        return False
    if filters.gender is not None and record.gender != filters.gender:
        return False
    if filters.view_position is not None and record.view_position != filters.view_position:
        return False
    if filters.age_min is not None and (record.age is None or record.age < filters.age_min):
        return False
    if filters.age_max is not None and (record.age is None or record.age > filters.age_max):
        return False
    return filters.finding is None or filters.finding in record.positive_findings


class InMemoryVectorStore:
    """A dict keyed by (study id, model version), searched with numpy. Thread-safe."""

    def __init__(self, *, ef_search: int = DEFAULT_EF_SEARCH) -> None:
        self.ef_search = ef_search
        self._rows: dict[tuple[str, str], EmbeddingRecord] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release; present so the fake can stand in wherever the store is closed."""

    def __enter__(self) -> InMemoryVectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upsert(self, record: EmbeddingRecord) -> None:
        self.upsert_many([record])

    def upsert_many(self, records: Iterable[EmbeddingRecord]) -> int:
        latest = {record.key: record for record in records}
        now = datetime.now(UTC)
        with self._lock:
            for key, record in latest.items():
                previous = self._rows.get(key)
                created = previous.created_at if previous and previous.created_at else now
                self._rows[key] = _as_stored(record, created, now)
        return len(latest)

    def get(self, study_id: str, model_version: str) -> EmbeddingRecord | None:
        check_text("study_id", study_id, required=True)
        check_text("model_version", model_version, required=True)
        with self._lock:
            return self._rows.get((study_id, model_version))

    def count(self, model_version: str | None = None) -> int:
        with self._lock:
            return sum(1 for k in self._rows if model_version is None or k[1] == model_version)

    def delete(self, study_id: str) -> int:
        check_text("study_id", study_id, required=True)
        with self._lock:
            keys = [k for k in self._rows if k[0] == study_id]
            for key in keys:
                del self._rows[key]
        return len(keys)

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
    ) -> list[Hit]:
        checked, query = validate_query(vector, space, k, ef_search)
        check_text("clip_version", clip_version)
        same_clip = checked != "clip" or clip_version is None
        check_text("model_version", model_version, required=True)
        active = filters or SearchFilters()
        with self._lock:
            candidates = [
                (r, v)
                for r in self._rows.values()
                if r.model_version == model_version
                and (same_clip or r.clip_version == clip_version)
                and (v := r.vector(checked)) is not None
                and _passes(r, active)
            ]
        if not candidates:
            return []
        matrix = np.stack([v for _, v in candidates]).astype(np.float64)
        # The query is rounded to float16 too: it is sent to PostgreSQL as a halfvec.
        q = query.astype(np.float16).astype(np.float64)
        similarity = (matrix @ q) / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(q))
        distance = 1.0 - np.clip(similarity, -1.0, 1.0)
        # Same order as the SQL: distance, then study_id.
        order = sorted(
            range(len(candidates)), key=lambda i: (distance[i], candidates[i][0].study_id)
        )
        hits = []
        for i in order[:k]:
            record = candidates[i][0]
            hits.append(Hit(record.study_id, record.patient_id, score_of(float(distance[i]))))
        return hits
