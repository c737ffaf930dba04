-- Jobs are now submitted through the outbox: a `transcripts` row is committed together with its
-- job.submitted message, so every row's message goes out and `published` says nothing any more.
-- Rows of the earlier two-step submission whose message never went out: a bucket drop is
-- forgotten (the inbox scan makes it a job again), an upload has no audio to run and fails.
DELETE FROM transcripts WHERE NOT published AND source = 'bucket' AND status = 'processing';
UPDATE transcripts SET status = 'error', stage = 'submitted', completed_at = now(), updated_at = now(),
       error = 'the submission did not complete; upload the file again'
 WHERE NOT published AND status = 'processing';
ALTER TABLE transcripts DROP COLUMN published;
