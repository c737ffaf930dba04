-- The last re-embedding run per model (services/ingest/reindex.py), shared by every ingest
-- replica: a run started through one replica is reported, and not started twice, by any other.
-- `error` says why it stopped, or which jobs it could not embed.
CREATE TABLE reindex_runs (
    model      text        PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz,
    error      text
);
