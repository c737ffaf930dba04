-- Recordings to match against their owner's people again after a change of them (an enrolment,
-- a rename, a forgetting): written in the transaction that makes the change, deleted by the
-- transaction that matches the recording again (services/ingest/speakers.py, 100 jobs a
-- transaction). A request cut off between the two (a restart, a lost database) leaves its rows
-- here, and any ingest's sweep finishes them once they are older than a grace period.
-- `announce`: the recording is told its names when matched again even if the matching changes
-- none (a forgetting took a name from it). `changes`: how many changes asked for it since it was
-- last matched (a matching deletes only the row it read: one a change wrote meanwhile stays due).
-- No foreign key on transcripts: its check locks the job, which a matching in progress holds
-- while it waits for the person the change is renaming (a deadlock); rows of deleted jobs are
-- dropped by the sweep.
CREATE TABLE speaker_matching_due (
    transcript_id bigint      PRIMARY KEY,
    announce      boolean     NOT NULL DEFAULT false,
    changes       integer     NOT NULL DEFAULT 1,
    pending_since timestamptz NOT NULL DEFAULT clock_timestamp()
);
