-- Jobs, their chunks, and the speaker-labelled segments with embeddings.
CREATE TABLE transcripts (
    id              bigserial PRIMARY KEY,
    filename        text        NOT NULL,
    source          text        NOT NULL DEFAULT 'upload' CHECK (source IN ('upload', 'bucket')),
    source_bucket   text,
    source_key      text,
    source_etag     text,
    audio_key       text,
    status          text        NOT NULL DEFAULT 'processing'
                                CHECK (status IN ('processing', 'done', 'error')),
    stage           text        NOT NULL DEFAULT 'submitted',
    progress        real        NOT NULL DEFAULT 0,
    chunk_count     integer,
    error           text,
    language        text,
    duration        double precision,
    options         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    published       boolean     NOT NULL DEFAULT false,
    result_written  boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    UNIQUE (source_bucket, source_key, source_etag)
);
CREATE INDEX transcripts_status_idx ON transcripts (status, created_at);

CREATE TABLE chunks (
    transcript_id   bigint      NOT NULL REFERENCES transcripts (id) ON DELETE CASCADE,
    chunk_index     integer     NOT NULL,
    segment_count   integer     NOT NULL DEFAULT 0,
    transcribed_at  timestamptz,
    embedded_at     timestamptz,
    PRIMARY KEY (transcript_id, chunk_index)
);

CREATE TABLE segments (
    transcript_id   bigint      NOT NULL REFERENCES transcripts (id) ON DELETE CASCADE,
    chunk_index     integer     NOT NULL,
    index           integer     NOT NULL,
    speaker         text        NOT NULL,
    start_ts        double precision NOT NULL,
    end_ts          double precision NOT NULL,
    text            text        NOT NULL,
    words           jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- real[] works everywhere; cast to pgvector's vector where that extension is installed.
    embedding       real[],
    embedding_model text,
    PRIMARY KEY (transcript_id, chunk_index, index)
);
CREATE INDEX segments_order_idx ON segments (transcript_id, start_ts);

-- Events written in the same transaction as the state they announce, published after commit.
CREATE TABLE outbox (
    id              bigserial   PRIMARY KEY,
    routing_key     text        NOT NULL,
    body            jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
