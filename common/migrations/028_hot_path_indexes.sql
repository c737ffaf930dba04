-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the indexes built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- Indexes for queries that ran as scans of a whole table:
-- the inbox's look for ended bucket drops whose result files are not written (every 30 s on one
-- ingest, with or without bucket drops);
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_drops_without_result_idx ON transcripts (id)
    WHERE source = 'bucket' AND NOT result_written;
-- forgetting or renaming an enrolled speaker, which finds the names it gave (and whose delete
-- clears matched_speaker_id by cascade).
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcript_speakers_matched_speaker_idx
    ON transcript_speakers (matched_speaker_id)
    WHERE matched_speaker_id IS NOT NULL;
