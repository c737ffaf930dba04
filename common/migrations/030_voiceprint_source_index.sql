-- Deleting a job sets source_transcript_id of the voiceprints enrolled from it to NULL (the
-- foreign key's ON DELETE SET NULL), and an enrolment from a job's speaker looks for one already
-- made from it: both found without reading every voiceprint.
CREATE INDEX voiceprints_source_transcript_idx ON voiceprints (source_transcript_id)
    WHERE source_transcript_id IS NOT NULL;
