-- Names of people are kept in Unicode NFC (common/messages.py person_name), so that one name typed
-- with a combining accent and with a precomposed letter is one person. Names stored before are
-- brought to NFC, except an enrolled name whose NFC form another of the owner's speakers already
-- has (the two stay apart, as they were: only one of them can have the name).
-- normalize() needs a UTF8 database; in any other, names could only ever be stored as they came.
DO $$
BEGIN
    IF current_setting('server_encoding') <> 'UTF8' THEN
        RETURN;
    END IF;
    UPDATE speakers s SET name = normalize(s.name, NFC)
      FROM (SELECT id, row_number() OVER (PARTITION BY coalesce(owner, ''), lower(normalize(name, NFC))
                                          ORDER BY name IS NFC NORMALIZED DESC, id) AS place
              FROM speakers) same_name
     WHERE same_name.id = s.id AND same_name.place = 1 AND s.name IS NOT NFC NORMALIZED;
    UPDATE transcript_speakers SET name = normalize(name, NFC) WHERE name IS NOT NFC NORMALIZED;
END
$$;
