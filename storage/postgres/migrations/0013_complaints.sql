-- The complaints desk (issue 14, section 3; server/domain/complaints.py, README "Complaints
-- desk"). A ticket from a consumer (through a partner app) or a merchant (a terminal's
-- credential), linked to one authorization, qualification or merchant. No ID number is ever
-- stored: a consumer is its consumer key. The contact phone is stored only sealed under the
-- provider's local data key (docs/privacy.md), or not at all.
CREATE TABLE tickets (
    ticket_id            text PRIMARY KEY CHECK (ticket_id ~ '^[0-9a-f]{32}$'),
    submitter            text NOT NULL CHECK (submitter IN ('CONSUMER', 'MERCHANT')),
    -- The credential that opened it (partner app or terminal) and its request id: a retry with
    -- the same request id answers with this ticket.
    opened_by            text NOT NULL,
    request_id           text NOT NULL,
    payload_hash         text NOT NULL,
    partner_id           text NOT NULL DEFAULT '',
    merchant_id          text NOT NULL DEFAULT '',
    consumer_key         text NOT NULL DEFAULT '' CHECK (consumer_key = '' OR consumer_key ~ '^[0-9a-f]{64}$'),
    category             text NOT NULL
        CHECK (category IN ('NOT_RECEIVED', 'WRONGLY_DECLINED', 'REFUND', 'MERCHANT_CONDUCT', 'OTHER')),
    state                text NOT NULL CHECK (state IN ('OPEN', 'IN_PROGRESS', 'RESOLVED', 'REJECTED')),
    link_kind            text NOT NULL CHECK (link_kind IN ('AUTHORIZATION', 'QUALIFICATION', 'MERCHANT')),
    link_id              text NOT NULL CHECK (link_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    body                 text NOT NULL CHECK (char_length(body) BETWEEN 1 AND 2000),
    contact_phone_sealed text NOT NULL DEFAULT ''
        CHECK (contact_phone_sealed = '' OR contact_phone_sealed ~ '^s1\.[A-Za-z0-9_-]{40,200}$'),
    assignee             text NOT NULL DEFAULT '',
    opened_at            timestamptz NOT NULL,
    first_reply_due_at   timestamptz NOT NULL,
    resolution_due_at    timestamptz NOT NULL,
    first_replied_at     timestamptz,
    closed_at            timestamptz,
    UNIQUE (opened_by, request_id),
    CHECK ((submitter = 'CONSUMER') = (consumer_key <> '' AND partner_id <> '')),
    CHECK (submitter = 'CONSUMER' OR merchant_id <> ''),
    CHECK ((state IN ('RESOLVED', 'REJECTED')) = (closed_at IS NOT NULL))
);
COMMENT ON COLUMN tickets.contact_phone_sealed IS
    'Empty, or a token sealed under the provider''s local data key; never a number in clear (docs/privacy.md)';
CREATE INDEX tickets_queue ON tickets (opened_at) WHERE closed_at IS NULL;
CREATE INDEX tickets_by_state ON tickets (state, opened_at);
-- The daily limits count a submitter's tickets since the business day's start.
CREATE INDEX tickets_consumer_opened ON tickets (consumer_key, opened_at) WHERE consumer_key <> '';
CREATE INDEX tickets_merchant_opened ON tickets (merchant_id, opened_at) WHERE submitter = 'MERCHANT';
CREATE INDEX tickets_closed ON tickets (closed_at) WHERE closed_at IS NOT NULL;

-- Every reply, in order; a move between states is a reply with from_state <> to_state.
-- Append-only like the ledger: what staff told a consumer is never rewritten.
CREATE TABLE ticket_replies (
    reply_id             bigserial PRIMARY KEY,
    ticket_id            text NOT NULL REFERENCES tickets (ticket_id),
    author               text NOT NULL,
    body                 text NOT NULL CHECK (char_length(body) BETWEEN 1 AND 2000),
    from_state           text NOT NULL,
    to_state             text NOT NULL,
    refund_request_id    text NOT NULL DEFAULT '',
    refunded_subsidy_fen bigint NOT NULL DEFAULT 0 CHECK (refunded_subsidy_fen >= 0),
    created_at           timestamptz NOT NULL
);
CREATE INDEX ticket_replies_ticket ON ticket_replies (ticket_id, reply_id);
CREATE TRIGGER ticket_replies_append_only BEFORE UPDATE OR DELETE ON ticket_replies
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ticket_replies_no_truncate BEFORE TRUNCATE ON ticket_replies
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
