-- A done job whose stored recording is still the upload, to be redacted by ingest's job-end step:
-- set by the persister in the transaction that marks the job done, when the job asked for
-- redaction or the transcriber replaced words of it ([PHONE], [CARD]...); cleared when the
-- redacted copy is written, or when that is given up for good (its decoded audio is gone). Until
-- then the recording is not served, copied by a rerun or retimed by a correction. Jobs ended
-- before this column are not held back (false).
ALTER TABLE transcripts ADD COLUMN audio_redaction_due boolean NOT NULL DEFAULT false;
