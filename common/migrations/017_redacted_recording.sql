-- When a job that asked for redaction had its stored recording replaced by the decoded audio with
-- the redacted words silent (a 16 kHz WAV); NULL: the recording is stored as uploaded.
ALTER TABLE transcripts ADD COLUMN audio_redacted_at timestamptz;
