-- When a segment's text or speaker was last corrected by hand (PATCH
-- /transcripts/{id}/segments/{chunk_index}/{index}); NULL: as the pipeline wrote it.
ALTER TABLE segments ADD COLUMN edited_at timestamptz;
