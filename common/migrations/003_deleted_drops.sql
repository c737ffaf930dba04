-- A bucket drop whose job was deleted (DELETE /transcripts/{id}): the inbox object is the
-- user's and stays, so its identity is kept here for the inbox scan not to run it again.
CREATE TABLE deleted_drops (
    source_bucket   text        NOT NULL,
    source_key      text        NOT NULL,
    source_etag     text        NOT NULL,
    deleted_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_bucket, source_key, source_etag)
);
