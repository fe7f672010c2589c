-- The operator side: stores, terminal-store binding, campaign settings for qualifications,
-- budget tranches, the audit trail of operator actions, and the reference version.

ALTER TABLE campaigns
    ADD COLUMN qualification_validity_s bigint NOT NULL DEFAULT 0 CHECK (qualification_validity_s >= 0),
    ADD COLUMN refund_policy text NOT NULL DEFAULT 'COUNT_AS_USED'
        CHECK (refund_policy IN ('RESTORE_ON_FULL_REFUND', 'COUNT_AS_USED'));

-- Release schedule of a category's budget: [{"release_at": ISO-8601, "amount_fen": n}, ...].
ALTER TABLE campaign_rules ADD COLUMN tranches jsonb NOT NULL DEFAULT '[]'::jsonb;

CREATE TABLE stores (
    store_id     text PRIMARY KEY CHECK (store_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    merchant_id  text NOT NULL REFERENCES merchants (merchant_id),
    kind         text NOT NULL CHECK (kind IN ('PHYSICAL', 'ONLINE')),
    name         text NOT NULL,
    address      text NOT NULL DEFAULT '',
    -- WGS-84, converted from the coordinate system the caller gave.
    latitude     double precision,
    longitude    double precision,
    platform     text NOT NULL DEFAULT '',
    shop_url     text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (kind = 'ONLINE' OR (latitude IS NOT NULL AND longitude IS NOT NULL))
);

ALTER TABLE terminals ADD COLUMN store_id text REFERENCES stores (store_id);

-- Who changed what and when: one row per operator action, append-only. The unique key makes
-- an operator's request_id idempotent.
CREATE TABLE operator_actions (
    action_id     bigserial PRIMARY KEY,
    operator_id   text NOT NULL,
    request_id    text NOT NULL,
    action        text NOT NULL,
    target_kind   text NOT NULL,
    target_id     text NOT NULL,
    payload_hash  text NOT NULL,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb,
    acted_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (operator_id, request_id)
);
CREATE TRIGGER operator_actions_append_only BEFORE UPDATE OR DELETE ON operator_actions
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER operator_actions_no_truncate BEFORE TRUNCATE ON operator_actions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Incremented in the same transaction as every reference-data change; the publisher makes
-- Redis catch up whenever the version it published is behind this one.
CREATE TABLE reference_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint NOT NULL
);
INSERT INTO reference_version (version) VALUES (0);

-- Changes committed but not yet confirmed published to Redis. The operator call deletes its
-- row after publishing; the publisher in the ledger-writer process publishes (and deletes)
-- any row left behind by a failed publication.
CREATE TABLE unpublished_changes (
    version       bigint PRIMARY KEY,
    campaign_ids  text[] NOT NULL DEFAULT '{}',
    merchant_ids  text[] NOT NULL DEFAULT '{}',
    gtins         text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
