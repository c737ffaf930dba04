-- migrate: no-transaction
-- Built CONCURRENTLY, outside a transaction, a statement at a time (common/db.py): a plain build
-- would block every write to these tables, which have a row per job ever, for the whole build,
-- while the version before still serves in a rolling upgrade. A build cut short leaves its index
-- INVALID; the next start drops it and builds it again.
--
-- GET /usage and GET /admin/usage for all owners at once (`ended_at` in a window, no owner): one
-- owner's, and the jobs without a key, have job_usage_owner_ended.
CREATE INDEX CONCURRENTLY IF NOT EXISTS job_usage_ended_idx ON job_usage (ended_at);
-- GET /transcripts?since=&until= of one owner (owner = and created_at in a window, newest id
-- first), and of everyone's (without API keys): the window is read through the index and only its
-- rows sorted, where transcripts_owner_idx (owner, id) read every job of the owner newer than the
-- window's end.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_owner_created_idx ON transcripts (owner, created_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_created_idx ON transcripts (created_at);
