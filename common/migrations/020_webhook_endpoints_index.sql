-- Every event's fan-out looks up the owner's own endpoints: an index of those alone, so that the
-- owner's jobs' callback URLs (one row per job that gave one) are not read on every event.
CREATE INDEX webhooks_endpoints_idx ON webhooks (coalesce(owner, '')) WHERE job_id IS NULL;
