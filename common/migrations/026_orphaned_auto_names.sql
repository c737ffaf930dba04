-- migrate: no-transaction
-- Outside a transaction, a statement at a time, the index built CONCURRENTLY (common/db.py, as 032):
-- a plain build blocks every write to a table that already has its rows for the whole build, while
-- the version before still serves in a rolling upgrade. Every statement bears running again.
--
-- Forgetting a speaker clears any automatic name whose matched speaker the delete's cascade
-- removed (common/speakerstore.delete_speaker): found without reading every recording speaker.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcript_speakers_orphaned_auto_name_idx
    ON transcript_speakers (transcript_id)
    WHERE name_source = 'auto' AND matched_speaker_id IS NULL;
