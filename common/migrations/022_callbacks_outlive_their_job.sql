-- A job's callback webhook outlives the job until its delivery is settled: deleting a job the
-- moment it ends lost its transcript.completed (the webhook and its pending delivery went with
-- the job). The notifier removes the webhook once that delivery is settled (services/notifier).
DO $$
DECLARE name text;
BEGIN
    SELECT c.conname INTO name FROM pg_constraint c
     WHERE c.conrelid = 'webhooks'::regclass AND c.contype = 'f'
       AND c.confrelid = 'transcripts'::regclass;
    IF name IS NOT NULL THEN
        EXECUTE format('ALTER TABLE webhooks DROP CONSTRAINT %I', name);
    END IF;
END $$;
