-- Enrolled speakers (common/speakerstore.py): a named person of one owner (the API key's hash, NULL
-- without keys) and the voiceprints that make up their profile (several rooms or microphones).
-- A voiceprint is a unit-length speaker embedding, from an audio sample (which is not kept) or
-- copied from a finished transcript's speaker; nothing else about the voice is stored.
CREATE TABLE speakers (
    id              bigserial   PRIMARY KEY,
    owner           text,
    name            text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX speakers_owner_name_idx ON speakers (coalesce(owner, ''), lower(name));

CREATE TABLE voiceprints (
    id                   bigserial   PRIMARY KEY,
    speaker_id           bigint      NOT NULL REFERENCES speakers (id) ON DELETE CASCADE,
    embedding            vector      NOT NULL,
    embedding_model      text        NOT NULL,
    speech_s             double precision NOT NULL DEFAULT 0,
    -- where it came from: a sample upload, or a transcript's speaker
    source               text        NOT NULL,
    source_transcript_id bigint      REFERENCES transcripts (id) ON DELETE SET NULL,
    source_label         text,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX voiceprints_speaker_idx ON voiceprints (speaker_id);

-- A recording speaker's name is 'manual' (PATCH /transcripts/{id}/speakers; always wins) or
-- 'auto' (matched to an enrolled speaker with that similarity); forgetting a speaker clears the
-- automatic names it gave.
ALTER TABLE transcript_speakers ADD COLUMN name_source text,
                                ADD COLUMN matched_speaker_id bigint REFERENCES speakers (id) ON DELETE SET NULL,
                                ADD COLUMN confidence double precision;
UPDATE transcript_speakers SET name_source = 'manual' WHERE name IS NOT NULL;
