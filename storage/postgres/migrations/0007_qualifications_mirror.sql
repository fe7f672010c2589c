-- Qualifications as mirrored from Redis (issue 6): the latest state of each, written by the
-- ledger writer process from the qualification stream (storage/postgres/qualifications.py), so
-- that support can read them and `server.ledger rebuild` can restore them after a Redis loss.
-- Each row is a snapshot; a redelivered or out-of-order event never overwrites a newer one.
CREATE TABLE qualifications (
    redemption_code      text PRIMARY KEY CHECK (redemption_code ~ '^[0-9A-HJKMNP-TV-Z]{16}$'),
    state                text NOT NULL CHECK (state IN ('ISSUED', 'RESERVED', 'REDEEMED', 'EXPIRED', 'CANCELLED')),
    campaign_id          text NOT NULL,
    category             text NOT NULL,
    consumer_key         text NOT NULL CHECK (consumer_key ~ '^[0-9a-f]{64}$'),
    partner_id           text NOT NULL,
    issued_at            timestamptz NOT NULL,
    expires_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    -- The authorization holding (RESERVED) or having used (REDEEMED) it; '' otherwise.
    authorization_id     text NOT NULL DEFAULT '',
    refund_policy        text NOT NULL,
    -- Support only: 330***********123X, 138****5678, a ~1 km cell. Never the numbers themselves.
    masked_id_number     text NOT NULL,
    masked_phone_number  text NOT NULL,
    location_cell        text NOT NULL,
    request_id           text NOT NULL,
    -- The stream entry this row reflects, to order redeliveries.
    last_event_ms        bigint NOT NULL,
    last_event_seq       bigint NOT NULL
);
CREATE INDEX qualifications_consumer ON qualifications (consumer_key);
CREATE INDEX qualifications_campaign ON qualifications (campaign_id, category, state);
