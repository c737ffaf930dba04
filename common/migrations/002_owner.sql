-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- With API_KEYS set, a job belongs to the key that created it (a hash, never the key).
ALTER TABLE transcripts ADD COLUMN IF NOT EXISTS owner text;
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_owner_idx ON transcripts (owner, id);
