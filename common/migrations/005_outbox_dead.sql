-- An outbox row that cannot be parsed or published is moved here (with why), so the events
-- after it still flow; an operator can inspect it and re-insert it into `outbox`.
CREATE TABLE outbox_dead (
    id              bigint      PRIMARY KEY,
    routing_key     text        NOT NULL,
    body            jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    error           text        NOT NULL,
    set_aside_at    timestamptz NOT NULL DEFAULT now()
);
