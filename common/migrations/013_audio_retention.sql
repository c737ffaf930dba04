-- When the uploaded recording (and its decoded PCM) was removed under AUDIO_RETENTION_DAYS, the
-- transcript kept; NULL while the recording is stored. The retention sweep looks jobs up by
-- when they ended.
ALTER TABLE transcripts ADD COLUMN audio_removed_at timestamptz;
CREATE INDEX transcripts_completed_at ON transcripts (completed_at) WHERE completed_at IS NOT NULL;
