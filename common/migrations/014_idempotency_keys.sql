-- POST /recognize and /transcripts/{id}/rerun with an Idempotency-Key header: the key (per owner)
-- and a hash of what was asked, so a request sent again makes no second job.
ALTER TABLE transcripts ADD COLUMN idempotency_key text, ADD COLUMN request_hash text;
CREATE UNIQUE INDEX transcripts_idempotency_idx ON transcripts (coalesce(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
