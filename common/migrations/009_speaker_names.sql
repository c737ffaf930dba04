-- Speakers can be named (PATCH /transcripts/{id}/speakers): a name is kept with the speaker's row,
-- which a name alone may create (backends that give no voice embedding, or a label named before the
-- diarizer reached it).
ALTER TABLE transcript_speakers ALTER COLUMN embedding DROP NOT NULL,
                                ALTER COLUMN embedding_model DROP NOT NULL,
                                ADD COLUMN name text;
