-- A request sent again (the OpenAI-compatible endpoint) finds the job it made while that runs and
-- for a while after it is done, so the index covers every job a request hash was stored for.
DROP INDEX IF EXISTS transcripts_running_request_hash_idx;
CREATE INDEX transcripts_request_hash_idx ON transcripts (request_hash) WHERE request_hash IS NOT NULL;
