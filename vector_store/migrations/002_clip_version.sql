-- Embeddings are keyed by (DenseNet version, CLIP version): the row key stays (study, DenseNet
-- model_version) and the CLIP vector carries the version of the CLIP model that made it, so a
-- clip-space search only ever compares vectors of one CLIP version. Rows written before this
-- migration have NULL (unknown): they still serve the densenet space, never a clip search.
ALTER TABLE study_embeddings ADD COLUMN clip_version text CHECK (clip_version <> '');
ALTER TABLE study_embeddings ADD CONSTRAINT study_embeddings_clip_version_with_vector
    CHECK (clip_version IS NULL OR clip_embedding IS NOT NULL);
