-- Forgetting a speaker clears any automatic name whose matched speaker the delete's cascade
-- removed (common/speakerstore.delete_speaker): found without reading every recording speaker.
CREATE INDEX transcript_speakers_orphaned_auto_name_idx ON transcript_speakers (transcript_id)
    WHERE name_source = 'auto' AND matched_speaker_id IS NULL;
