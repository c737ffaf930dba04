-- The retention sweep marks a recording removed (audio_removed_at) before it removes the objects,
-- so that a redaction rewriting it meanwhile sees the mark; audio_objects_removed_at says the
-- objects are gone. A mark without it (an ingest stopped in between, a store that refused) is
-- removed again by the next sweep. Marks made before this column are taken as unconfirmed: their
-- objects are removed once more (removing what is gone succeeds). The index holds only the jobs
-- whose recording is still stored, which are all the sweep looks through.
ALTER TABLE transcripts ADD COLUMN audio_objects_removed_at timestamptz;
CREATE INDEX transcripts_recording_stored_idx ON transcripts (completed_at)
    WHERE audio_objects_removed_at IS NULL AND completed_at IS NOT NULL;
