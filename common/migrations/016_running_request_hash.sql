-- The same OpenAI-style transcription request sent again while its job runs (a client's retry
-- after a timeout) finds that job by the request's hash instead of making another.
CREATE INDEX transcripts_running_request_hash_idx ON transcripts (request_hash) WHERE status = 'processing';
