-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- Full-text search over segments: a tsvector per segment in its transcript's language (Russian
-- and English stemmed, anything else as plain words), GIN-indexed. The persister fills it when it
-- stores a segment; rows stored before are filled here.
CREATE OR REPLACE FUNCTION stt_text_config(language text) RETURNS regconfig
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE language WHEN 'ru' THEN 'russian'::regconfig WHEN 'en' THEN 'english'::regconfig
                         ELSE 'simple'::regconfig END;
ALTER TABLE segments ADD COLUMN IF NOT EXISTS search_text tsvector;
UPDATE segments s SET search_text = to_tsvector(stt_text_config(t.language), s.text)
    FROM transcripts t WHERE t.id = s.transcript_id;
CREATE INDEX CONCURRENTLY IF NOT EXISTS segments_search_text_idx ON segments USING gin (search_text);
