-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- The retention sweep marks a recording removed (audio_removed_at) before it removes the objects,
-- so that a redaction rewriting it meanwhile sees the mark; audio_objects_removed_at says the
-- objects are gone. A mark without it (an ingest stopped in between, a store that refused) is
-- removed again by the next sweep. Marks made before this column are taken as unconfirmed: their
-- objects are removed once more (removing what is gone succeeds). The index holds only the jobs
-- whose recording is still stored, which are all the sweep looks through.
ALTER TABLE transcripts ADD COLUMN IF NOT EXISTS audio_objects_removed_at timestamptz;
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_recording_stored_idx ON transcripts (completed_at)
    WHERE audio_objects_removed_at IS NULL AND completed_at IS NOT NULL;
