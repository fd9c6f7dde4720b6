-- HAPI keeps its own database beside ours; pgvector lives in ours.
CREATE DATABASE hapi OWNER cxr;
\connect cxr
CREATE EXTENSION IF NOT EXISTS vector;
