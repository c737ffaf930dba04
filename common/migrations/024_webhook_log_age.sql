-- The notifier removes settled deliveries older than WEBHOOK_LOG_DAYS, hourly: found by when
-- they were settled without reading the whole log.
CREATE INDEX webhook_deliveries_settled_idx ON webhook_deliveries (finished_at) WHERE status <> 'pending';
-- Deleting a job removes its settled deliveries (jobstore.delete_job).
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id);
