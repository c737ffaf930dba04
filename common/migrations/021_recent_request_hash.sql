-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- A request sent again (the OpenAI-compatible endpoint) finds the job it made while that runs and
-- for a while after it is done, so the index covers every job a request hash was stored for.
-- The new index first: the old one serves the running jobs' look-ups until it is built.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_request_hash_idx ON transcripts (request_hash)
    WHERE request_hash IS NOT NULL;
DROP INDEX CONCURRENTLY IF EXISTS transcripts_running_request_hash_idx;
