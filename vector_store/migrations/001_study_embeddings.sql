-- One row per (study, model version): the embeddings of one processed ImagingStudy and the
-- columns that $similar filters on. The worker re-processes studies, so the key is enforced
-- here and writes are upserts.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE study_embeddings (
    study_id          text        NOT NULL CHECK (study_id <> ''),
    model_version     text        NOT NULL CHECK (model_version <> ''),
    study_version_id  text        NOT NULL,
    patient_id        text,
    -- FHIR AdministrativeGender codes, so the $similar `gender` parameter maps 1:1.
    gender            text        CHECK (gender IN ('male', 'female', 'other', 'unknown')),
    age               integer     CHECK (age BETWEEN 0 AND 150),
    view_position     text,
    positive_findings text[]      NOT NULL DEFAULT '{}',
    image_sha256      text        CHECK (image_sha256 ~ '^[0-9a-f]{64}$'),
    -- halfvec, not vector: the measured recall is the same at ef_search >= 100 while the HNSW
    -- index is half the size (146 vs 292 MB at 112k x 512), builds ~20% faster and answers
    -- 15-30% faster (shared/docs/notes/pgvector.md). Model features carry far less than
    -- float16's 11 bits of meaningful precision; scores are exact to ~1e-3.
    -- Both are nullable so a backfill can fill one space at a time; at least one is required.
    clip_embedding    halfvec(512),
    densenet_features halfvec(1024),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (study_id, model_version),
    CHECK (clip_embedding IS NOT NULL OR densenet_features IS NOT NULL)
);

-- pgvector types default to STORAGE EXTERNAL. halfvec(1024) is 2,052 bytes and a row with both
-- vectors ~3.2 kB, over the ~2 kB TOAST threshold, so one vector would be moved out of line and
-- every exact (sequential) scan would de-TOAST it: 3.4x slower in the notes' measurement.
-- PLAIN keeps both inline; the widest row (~3.3 kB) still fits an 8 kB page.
ALTER TABLE study_embeddings
    ALTER COLUMN clip_embedding SET STORAGE PLAIN,
    ALTER COLUMN densenet_features SET STORAGE PLAIN;

-- `finding` filters use positive_findings @> ARRAY[...], which GIN serves.
CREATE INDEX study_embeddings_findings_gin ON study_embeddings USING gin (positive_findings);
CREATE INDEX study_embeddings_patient_idx ON study_embeddings (patient_id);

-- Cosine HNSW per space. m / ef_construction must equal vector_store.store.DEFAULT_M /
-- DEFAULT_EF_CONSTRUCTION (a test checks it); vector_store.migrate.build_hnsw_index rebuilds
-- with other parameters for benchmarks and after bulk backfills.
CREATE INDEX study_embeddings_clip_hnsw ON study_embeddings
    USING hnsw (clip_embedding halfvec_cosine_ops) WITH (m = 16, ef_construction = 128);
CREATE INDEX study_embeddings_densenet_hnsw ON study_embeddings
    USING hnsw (densenet_features halfvec_cosine_ops) WITH (m = 16, ef_construction = 128);
