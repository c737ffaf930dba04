-- The stall reaper's heartbeat, shared by every persister: time between two of its rounds longer
-- than a few rounds is time no persister stored anything (PostgreSQL down, or no persister
-- running), kept in stall_reaper_gaps. A job's lack of progress then is not counted: its messages
-- waited in stt.persister. In the database, so that a persister restarted during an outage, or
-- another replica, still knows of it.
CREATE TABLE stall_reaper_heartbeat (
    one boolean     PRIMARY KEY DEFAULT true CHECK (one),
    at  timestamptz NOT NULL
);
INSERT INTO stall_reaper_heartbeat (at) VALUES (now());

CREATE TABLE stall_reaper_gaps (
    since timestamptz PRIMARY KEY,
    until timestamptz NOT NULL
);
