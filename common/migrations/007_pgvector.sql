-- Embeddings become pgvector vectors, so they can be searched. Several embedding models may
-- coexist in one column (each row names its model); the persister creates one HNSW cosine index
-- per model and dimension the first time it stores that model's vectors (common/jobstore.py).
CREATE EXTENSION IF NOT EXISTS vector;
ALTER TABLE segments ALTER COLUMN embedding TYPE vector USING embedding::vector;
ALTER TABLE transcript_speakers ALTER COLUMN embedding TYPE vector USING embedding::vector;
