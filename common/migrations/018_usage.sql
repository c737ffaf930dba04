-- Usage per API key: one row per job when it ends, kept when the job is deleted (by hand or by
-- retention), so GET /usage counts what was processed, not what is still stored.
CREATE TABLE job_usage (
    job_id   bigint PRIMARY KEY,
    owner    text,
    ended_at timestamptz NOT NULL,
    status   text NOT NULL,
    audio_s  double precision NOT NULL DEFAULT 0
);
CREATE INDEX job_usage_owner_ended ON job_usage (owner, ended_at);

INSERT INTO job_usage (job_id, owner, ended_at, status, audio_s)
SELECT id, owner, COALESCE(completed_at, updated_at), status, COALESCE(duration, 0)
FROM transcripts WHERE status <> 'processing';
