-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- The same OpenAI-style transcription request sent again while its job runs (a client's retry
-- after a timeout) finds that job by the request's hash instead of making another.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_running_request_hash_idx ON transcripts (request_hash)
    WHERE status = 'processing';
