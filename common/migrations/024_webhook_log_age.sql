-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the indexes built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- The notifier removes settled deliveries older than WEBHOOK_LOG_DAYS, hourly: found by when
-- they were settled without reading the whole log.
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_settled_idx ON webhook_deliveries (finished_at)
    WHERE status <> 'pending';
-- Deleting a job removes its settled deliveries (jobstore.delete_job).
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_job_idx ON webhook_deliveries (job_id);
