-- What a re-embedding run is responsible for (services/ingest/reindex.py): the jobs up to the
-- newest there as it began (`newest_job`; those started since are the embedder's), which its
-- counts cover; and whether it saw the embedder embed one of those later jobs with another model
-- (`embedder_not_switched`): then, and only then, `stt reindex` says to switch the embedder.
-- `bounds_started_at` is the `started_at` of the run that wrote those two: a run begun by an ingest
-- from before them (a rolling upgrade) sets `started_at` alone, and its row's are then not its own.
ALTER TABLE reindex_runs ADD COLUMN IF NOT EXISTS newest_job bigint,
                         ADD COLUMN IF NOT EXISTS embedder_not_switched boolean NOT NULL DEFAULT false,
                         ADD COLUMN IF NOT EXISTS bounds_started_at timestamptz;
