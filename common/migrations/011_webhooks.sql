-- Webhooks (services/notifier): an owner's endpoint (the API key's hash, NULL without keys) and
-- the events it takes; or one job's callback_url (job_id set), which takes that job's
-- transcript.completed and transcript.failed. The secret signs every delivery.
CREATE TABLE webhooks (
    id          bigserial   PRIMARY KEY,
    owner       text,
    url         text        NOT NULL,
    events      text[]      NOT NULL,
    secret      text        NOT NULL,
    job_id      bigint      REFERENCES transcripts (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_owner_idx ON webhooks (coalesce(owner, ''));
CREATE INDEX webhooks_job_idx ON webhooks (job_id) WHERE job_id IS NOT NULL;

-- One event for one endpoint. A job's deliveries to one endpoint go out in id order, one at a
-- time: a later one waits while an earlier one is pending.
CREATE TABLE webhook_deliveries (
    id              bigserial   PRIMARY KEY,
    webhook_id      bigint      NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id        text        NOT NULL,
    event_type      text        NOT NULL,
    job_id          bigint      NOT NULL,
    payload         text        NOT NULL,
    -- pending | delivered | failed
    status          text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_pending_idx ON webhook_deliveries (webhook_id, job_id, id) WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id  bigint      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer     NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    latency_ms   integer     NOT NULL,
    error        text,
    PRIMARY KEY (delivery_id, attempt)
);
