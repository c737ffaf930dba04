-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- GET /transcripts?reference=... finds a submitter's job by its own name for it (options.reference)
-- without reading every row.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_reference ON transcripts ((options->>'reference'));
