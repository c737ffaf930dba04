-- Ingest embeds, every minute, the segments corrected by hand while the embedding service was
-- away (services/ingest/reindex.py): found without reading every segment.
CREATE INDEX segments_corrected_without_vector_idx ON segments (transcript_id)
    WHERE embedding IS NULL AND edited_at IS NOT NULL;
