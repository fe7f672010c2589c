-- The fund ledger: every event of the Redis stream lands here exactly once (ledger_events,
-- keyed by the stream entry id), is posted as balanced double-entry lines (ledger_entries,
-- hash-chained per campaign), and updates the authorization's current state.

-- One row per stream event, exactly once (the primary key makes redelivery harmless).
CREATE TABLE ledger_events (
    event_id          text PRIMARY KEY,          -- Redis stream entry id "<ms>-<seq>"
    event_ms          bigint NOT NULL,           -- its two parts, for ordering
    event_seq         bigint NOT NULL,
    event_type        text NOT NULL CHECK (event_type IN ('AUTHORIZED', 'CAPTURED', 'VOIDED', 'EXPIRED', 'REFUNDED')),
    authorization_id  text NOT NULL,
    campaign_id       text NOT NULL,
    merchant_id       text NOT NULL,
    terminal_id       text NOT NULL,
    consumer_key      text NOT NULL,
    request_id        text NOT NULL,
    amount_fen        bigint NOT NULL CHECK (amount_fen >= 0),
    occurred_at       timestamptz NOT NULL,      -- Redis TIME when the script ran
    lines             jsonb NOT NULL,            -- the lines this event moved money for
    payload           jsonb NOT NULL,            -- the event as emitted
    written_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_events_authorization ON ledger_events (authorization_id);
CREATE INDEX ledger_events_campaign ON ledger_events (campaign_id, event_ms, event_seq);

-- Double entry: each event posts, per category, one debit line and one credit line of the
-- same amount. Accounts: AVAILABLE (campaign-category budget not yet used), PENDING (holds),
-- MERCHANT_RECEIVABLE (subsidy owed to the merchant after capture). A refund moves money from
-- MERCHANT_RECEIVABLE back to AVAILABLE. Balances are debits minus credits.
CREATE TABLE ledger_entries (
    campaign_id       text NOT NULL,
    entry_seq         bigint NOT NULL,           -- 1, 2, 3 ... per campaign: the chain order
    event_id          text NOT NULL REFERENCES ledger_events (event_id),
    event_type        text NOT NULL,
    authorization_id  text NOT NULL,
    category          text NOT NULL,
    account           text NOT NULL CHECK (account IN ('AVAILABLE', 'PENDING', 'MERCHANT_RECEIVABLE')),
    merchant_id       text NOT NULL,
    debit_fen         bigint NOT NULL CHECK (debit_fen >= 0),
    credit_fen        bigint NOT NULL CHECK (credit_fen >= 0),
    occurred_at       timestamptz NOT NULL,
    prev_hash         text NOT NULL,
    entry_hash        text NOT NULL,
    PRIMARY KEY (campaign_id, entry_seq),
    CHECK ((debit_fen = 0) <> (credit_fen = 0))
);
CREATE INDEX ledger_entries_event ON ledger_entries (event_id);

-- The head of each campaign's chain: the last sequence number and hash. Locked while a batch
-- appends, so concurrent writers extend each chain one at a time.
CREATE TABLE ledger_chain_heads (
    campaign_id  text PRIMARY KEY,
    last_seq     bigint NOT NULL,
    last_hash    text NOT NULL
);

-- Append-only, enforced by the database: no UPDATE, DELETE or TRUNCATE of ledger rows, by
-- anyone going through normal sessions. Corrections are reversing entries.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger rows are append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_events_append_only BEFORE UPDATE OR DELETE ON ledger_events
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_events_no_truncate BEFORE TRUNCATE ON ledger_events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Current state, one row per authorization, written from the newest event seen for it.
CREATE TABLE authorizations (
    authorization_id  text PRIMARY KEY,
    campaign_id       text NOT NULL,
    merchant_id       text NOT NULL,
    terminal_id       text NOT NULL,
    consumer_key      text NOT NULL,
    channel           smallint NOT NULL,
    state             text NOT NULL,
    total_price_fen   bigint NOT NULL,
    subsidy_fen       bigint NOT NULL,
    refunded_fen      bigint NOT NULL,
    lines             jsonb NOT NULL,
    created_at        timestamptz NOT NULL,
    hold_expires_at   timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    last_event_ms     bigint NOT NULL,
    last_event_seq    bigint NOT NULL
);
CREATE INDEX authorizations_campaign ON authorizations (campaign_id, state);

-- The long-lived idempotency record: one row per (terminal, request id) that acted. A request
-- id reused for a different action after Redis forgot it is caught here.
CREATE TABLE idempotency_records (
    terminal_id       text NOT NULL,
    request_id        text NOT NULL,
    payload_hash      text NOT NULL,
    event_type        text NOT NULL,
    authorization_id  text NOT NULL,
    event_id          text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, request_id)
);

-- Actions whose request id had already acted (found by the unique key above).
CREATE TABLE duplicate_requests (
    event_id               text PRIMARY KEY,
    terminal_id            text NOT NULL,
    request_id             text NOT NULL,
    authorization_id       text NOT NULL,
    first_authorization_id text NOT NULL,
    resolution             text NOT NULL,
    detected_at            timestamptz NOT NULL DEFAULT now()
);
