-- The names of the people a job expects (transcripts.options' expected_speakers), written before
-- names were kept in NFC, brought to NFC as 034 brought the enrolled names: compared with those
-- byte for byte, a job expecting "José" written with a combining accent no longer found him. A
-- name that one of the owner's speakers still has exactly as written (one 034 kept apart) stays.
DO $$
BEGIN
    IF current_setting('server_encoding') <> 'UTF8' THEN
        RETURN;
    END IF;
    UPDATE transcripts t SET options = jsonb_set(t.options, '{expected_speakers}', (
        SELECT jsonb_agg(CASE WHEN EXISTS (SELECT 1 FROM speakers s WHERE coalesce(s.owner, '') = coalesce(t.owner, '')
                                                                       AND s.name = given.n)
                              THEN given.n ELSE normalize(given.n, NFC) END ORDER BY given.i)
          FROM jsonb_array_elements_text(t.options -> 'expected_speakers') WITH ORDINALITY AS given(n, i)))
     WHERE jsonb_typeof(t.options -> 'expected_speakers') = 'array'
       AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(t.options -> 'expected_speakers') AS given(n)
                    WHERE given.n IS NOT NFC NORMALIZED);
END
$$;
