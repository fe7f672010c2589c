-- Hot-path risk rules (issue 14, section 1).

-- The operator's block lists: one row per subject ever blocked; the row is the block as it now
-- stands (lifted: removed_at set). Who changed it and why is also in operator_actions. Redis
-- holds the blocks in force in one hash that the scripts read (storage/redis/blocks.py);
-- change_seq orders the changes, and the largest one is the version Redis is compared with, so
-- the ledger writer's publisher re-publishes the list after a Redis loss or a failed publication.
CREATE SEQUENCE risk_block_changes;
CREATE TABLE risk_blocks (
    kind        text NOT NULL CHECK (kind IN ('CONSUMER', 'DEVICE', 'MERCHANT', 'TERMINAL', 'PARTNER_APP')),
    subject_id  text NOT NULL CHECK (length(subject_id) BETWEEN 1 AND 64),
    reason      text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    expires_at  timestamptz,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    removed_by  text,
    removed_at  timestamptz,
    change_seq  bigint NOT NULL DEFAULT nextval('risk_block_changes'),
    PRIMARY KEY (kind, subject_id)
);

-- Every decline by a risk rule and every flag, written by the ledger writer process from the
-- risk event stream that the scripts append to in the same call (storage/postgres/risk_events.py).
-- stream_id is the Redis stream entry id: a redelivered entry is the same row (exactly once).
CREATE TABLE risk_events (
    event_id         bigserial PRIMARY KEY,
    stream_id        text NOT NULL UNIQUE,
    action           text NOT NULL CHECK (action IN ('DECLINE', 'FLAG')),
    rule             text NOT NULL,
    subject_kind     text NOT NULL,
    subject_id       text NOT NULL,
    campaign_id      text NOT NULL,
    merchant_id      text NOT NULL,
    terminal_id      text NOT NULL,
    request_id       text NOT NULL,
    authorization_id text NOT NULL DEFAULT '',
    evidence         jsonb NOT NULL,
    occurred_at      timestamptz NOT NULL
);
CREATE INDEX risk_events_subject ON risk_events (subject_kind, subject_id, occurred_at);
CREATE INDEX risk_events_occurred ON risk_events (occurred_at);

-- A campaign's hot-path velocity limits and price-flag settings (Campaign.risk_limits): the
-- message's fields by name, 0 or absent meaning none.
ALTER TABLE campaigns ADD COLUMN risk_limits jsonb NOT NULL DEFAULT '{}'::jsonb;
