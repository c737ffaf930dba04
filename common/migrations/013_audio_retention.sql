-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- When the uploaded recording (and its decoded PCM) was removed under AUDIO_RETENTION_DAYS, the
-- transcript kept; NULL while the recording is stored. The retention sweep looks jobs up by
-- when they ended.
ALTER TABLE transcripts ADD COLUMN IF NOT EXISTS audio_removed_at timestamptz;
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_completed_at ON transcripts (completed_at)
    WHERE completed_at IS NOT NULL;
