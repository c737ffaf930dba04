-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- Ingest embeds, every minute, the segments corrected by hand while the embedding service was
-- away (services/ingest/reindex.py): found without reading every segment.
CREATE INDEX CONCURRENTLY IF NOT EXISTS segments_corrected_without_vector_idx ON segments (transcript_id)
    WHERE embedding IS NULL AND edited_at IS NOT NULL;
