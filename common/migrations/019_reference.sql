-- GET /transcripts?reference=... finds a submitter's job by its own name for it (options.reference)
-- without reading every row.
CREATE INDEX transcripts_reference ON transcripts ((options->>'reference'));
