-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- Deleting a job sets source_transcript_id of the voiceprints enrolled from it to NULL (the
-- foreign key's ON DELETE SET NULL), and an enrolment from a job's speaker looks for one already
-- made from it: both found without reading every voiceprint.
CREATE INDEX CONCURRENTLY IF NOT EXISTS voiceprints_source_transcript_idx ON voiceprints (source_transcript_id)
    WHERE source_transcript_id IS NOT NULL;
