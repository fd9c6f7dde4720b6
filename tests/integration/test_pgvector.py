"""The real PostgreSQL server has pgvector, and exact k-NN finds the right neighbour."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

pytestmark = pytest.mark.integration


def test_vector_extension_and_exact_knn(database: str) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(500, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    target = 321
    query = vectors[target] + rng.normal(scale=0.01, size=64).astype(np.float32)

    with psycopg.connect(database) as conn:
        version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
        assert version is not None and tuple(map(int, version[0].split(".")[:2])) >= (0, 8)
        register_vector(conn)
        conn.execute("CREATE TEMP TABLE knn_probe (id int PRIMARY KEY, v vector(64))")
        with conn.cursor().copy("COPY knn_probe (id, v) FROM STDIN WITH (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "vector"])
            for i, v in enumerate(vectors):
                cp.write_row((i, v))
        rows = conn.execute(
            "SELECT id, 1 - (v <=> %s) AS cos FROM knn_probe ORDER BY v <=> %s LIMIT 3",
            (query, query),
        ).fetchall()

    expected = np.argsort(-(vectors @ query))[:3]
    assert [r[0] for r in rows] == expected.tolist()
    assert rows[0][0] == target
    assert rows[0][1] > 0.99
