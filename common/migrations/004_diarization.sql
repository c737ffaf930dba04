-- The diarizer's own output, kept per job: who spoke when (turns may overlap; RTTM is made from
-- these), each speaker's voice embedding (for recognising voices later), and whether another
-- speaker talks during a segment.
CREATE TABLE speaker_turns (
    transcript_id   bigint      NOT NULL REFERENCES transcripts (id) ON DELETE CASCADE,
    chunk_index     integer     NOT NULL,
    index           integer     NOT NULL,
    speaker         text        NOT NULL,
    start_ts        double precision NOT NULL,
    end_ts          double precision NOT NULL,
    PRIMARY KEY (transcript_id, chunk_index, index)
);
CREATE INDEX speaker_turns_order_idx ON speaker_turns (transcript_id, start_ts);

CREATE TABLE transcript_speakers (
    transcript_id   bigint      NOT NULL REFERENCES transcripts (id) ON DELETE CASCADE,
    speaker         text        NOT NULL,
    embedding       real[]      NOT NULL,
    embedding_model text        NOT NULL,
    speech_s        double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (transcript_id, speaker)
);

ALTER TABLE segments ADD COLUMN overlap boolean NOT NULL DEFAULT false;
