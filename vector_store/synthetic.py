"""Synthetic embedding corpora for the benchmarks and the recall tests.

Vectors shaped like single-modality CLIP image embeddings and filter columns drawn
independently of them, with the exact top-k as ground truth. Kept in the package (like
httpx's ``MockTransport``) so that ``bench/`` and ``tests/`` share it without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vector_store.records import EmbeddingRecord

__all__ = [
    "AGE_RANGE",
    "RARE_FINDING",
    "Matrix",
    "Metadata",
    "clustered_vectors",
    "exact_top_k",
    "record",
    "synthetic_metadata",
]

Matrix = npt.NDArray[np.float32]

#: The finding that a ~2% filter selects (independent of the embedding, like the notes' data).
RARE_FINDING = "Rare"


#: Ages are uniform over 50 values, so one age keeps ~2% of the rows.
AGE_RANGE = (20, 70)


def clustered_vectors(
    n: int, dim: int = 512, *, clusters: int = 200, seed: int = 42
) -> tuple[Matrix, npt.NDArray[np.int64]]:
    """``n`` unit vectors that resemble single-modality CLIP image embeddings; and cluster ids.

    As in shared/docs/notes/pgvector.md: Dirichlet(0.7) cluster sizes; centres share one
    direction (CLIP embeddings of one modality are strongly anisotropic); within a cluster a
    power-law noise spectrum in a random basis, scaled per cluster, plus a little isotropic
    noise. With n = 112,120 the mean cosine of a held-out query to its 1st / 10th neighbour is
    ~0.78 / 0.76 and to a random vector ~0.25, close to the notes' 0.79 / 0.76 / 0.23.
    """
    rng = np.random.default_rng(seed)

    def unit(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))

    shared = unit(rng.standard_normal(dim))
    centres = unit(0.6 * shared + 0.8 * unit(rng.standard_normal((clusters, dim))))
    centres = centres.astype(np.float32)
    sizes = rng.multinomial(n, rng.dirichlet(np.full(clusters, 0.7)))
    labels = np.repeat(np.arange(clusters), sizes)
    rng.shuffle(labels)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    spectrum = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    # 0.23 calibrates the neighbour cosines above.
    radius = (0.23 * rng.uniform(0.5, 1.0, clusters)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    step = 65_536  # bounds the temporaries at 1M rows
    for start in range(0, n, step):
        lab = labels[start : start + step]
        z = rng.standard_normal((len(lab), dim), dtype=np.float32) * spectrum
        noise = (z @ basis) * radius[lab, None]
        noise += 0.02 * rng.standard_normal((len(lab), dim), dtype=np.float32)
        out[start : start + step] = unit(centres[lab] + noise)
    return out, labels.astype(np.int64)


@dataclass(frozen=True)
class Metadata:
    """Filter columns, drawn independently of the embeddings."""

    patient_ids: list[str]
    genders: npt.NDArray[np.str_]
    views: npt.NDArray[np.str_]
    ages: npt.NDArray[np.int64]
    rare: npt.NDArray[np.bool_]


def synthetic_metadata(n: int, *, seed: int = 7) -> Metadata:
    """Gender 50/50, view PA 60%, age uniform over 50 years, the rare finding on 2%."""
    rng = np.random.default_rng(seed)
    return Metadata(
        patient_ids=[f"p{i}" for i in rng.integers(0, max(1, n // 4), n)],
        genders=np.where(rng.random(n) < 0.5, "female", "male"),
        views=np.where(rng.random(n) < 0.6, "PA", "AP"),
        ages=rng.integers(*AGE_RANGE, n),
        rare=rng.random(n) < 0.02,
    )


def record(
    meta: Metadata, data: Matrix, i: int, study_id: str, model_version: str
) -> EmbeddingRecord:
    """Row ``i`` of the synthetic corpus as the store's EmbeddingRecord."""
    return EmbeddingRecord(
        study_id=study_id,
        model_version=model_version,
        study_version_id="1",
        clip=data[i],
        patient_id=meta.patient_ids[i],
        gender=str(meta.genders[i]),
        age=int(meta.ages[i]),
        view_position=str(meta.views[i]),
        positive_findings=(RARE_FINDING,) if meta.rare[i] else (),
    )


def exact_top_k(
    matrix: Matrix, queries: Matrix, k: int, rows: npt.NDArray[np.int64] | None = None
) -> npt.NDArray[np.int64]:
    """Indices (into ``matrix``) of the exact top-k cosine neighbours of each unit query."""
    index = np.arange(len(matrix)) if rows is None else rows
    sub = matrix[index]
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 100):
        sims = queries[start : start + 100] @ sub.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + 100] = index[np.take_along_axis(top, order, axis=1)]
    return out
