-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- Every event's fan-out looks up the owner's own endpoints: an index of those alone, so that the
-- owner's jobs' callback URLs (one row per job that gave one) are not read on every event.
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhooks_endpoints_idx ON webhooks (coalesce(owner, ''))
    WHERE job_id IS NULL;
