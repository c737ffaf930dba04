-- Indexes for queries that ran as scans of a whole table:
-- the inbox's look for ended bucket drops whose result files are not written (every 30 s on one
-- ingest, with or without bucket drops);
CREATE INDEX transcripts_drops_without_result_idx ON transcripts (id)
    WHERE source = 'bucket' AND NOT result_written;
-- forgetting or renaming an enrolled speaker, which finds the names it gave (and whose delete
-- clears matched_speaker_id by cascade).
CREATE INDEX transcript_speakers_matched_speaker_idx ON transcript_speakers (matched_speaker_id)
    WHERE matched_speaker_id IS NOT NULL;
