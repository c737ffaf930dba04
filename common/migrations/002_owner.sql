-- With API_KEYS set, a job belongs to the key that created it (a hash, never the key).
ALTER TABLE transcripts ADD COLUMN owner text;
CREATE INDEX transcripts_owner_idx ON transcripts (owner, id);
