-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- POST /recognize and /transcripts/{id}/rerun with an Idempotency-Key header: the key (per owner)
-- and a hash of what was asked, so a request sent again makes no second job.
ALTER TABLE transcripts ADD COLUMN IF NOT EXISTS idempotency_key text,
                        ADD COLUMN IF NOT EXISTS request_hash text;
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS transcripts_idempotency_idx
    ON transcripts (coalesce(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
