-- Reference data: the system of record for campaigns, rules, products, merchants and
-- terminals. Redis holds a published copy for the hot path (storage/redis/reference.py).

CREATE TABLE campaigns (
    campaign_id   text PRIMARY KEY CHECK (campaign_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name          text NOT NULL,
    status        text NOT NULL CHECK (status IN ('ACTIVE', 'PAUSED')),
    starts_at     timestamptz NOT NULL,
    ends_at       timestamptz NOT NULL,
    region        jsonb,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

CREATE TABLE campaign_rules (
    campaign_id        text NOT NULL REFERENCES campaigns (campaign_id),
    category           text NOT NULL CHECK (category ~ '^[a-z0-9_]{1,32}$'),
    kind               text NOT NULL CHECK (kind IN ('PERCENT', 'FIXED')),
    -- Energy grade ("0" = no grade) -> rate in basis points; grades absent earn nothing.
    rates_bp           jsonb NOT NULL DEFAULT '{}'::jsonb,
    cap_fen            bigint NOT NULL DEFAULT 0 CHECK (cap_fen >= 0),
    threshold_fen      bigint NOT NULL DEFAULT 0 CHECK (threshold_fen >= 0),
    off_fen            bigint NOT NULL DEFAULT 0 CHECK (off_fen >= 0),
    price_ceiling_fen  bigint NOT NULL DEFAULT 0 CHECK (price_ceiling_fen >= 0),
    per_person_limit   integer NOT NULL CHECK (per_person_limit > 0),
    budget_fen         bigint NOT NULL CHECK (budget_fen >= 0 AND budget_fen < 10000000000000),
    PRIMARY KEY (campaign_id, category)
);

CREATE TABLE products (
    gtin                 text PRIMARY KEY CHECK (gtin ~ '^[0-9]{13}$'),
    brand                text NOT NULL,
    model                text NOT NULL,
    category             text NOT NULL,
    energy_grade         smallint NOT NULL DEFAULT 0 CHECK (energy_grade BETWEEN 0 AND 5),
    reference_price_fen  bigint NOT NULL DEFAULT 0 CHECK (reference_price_fen >= 0),
    serial_required      boolean NOT NULL DEFAULT false,
    active               boolean NOT NULL DEFAULT true,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE merchants (
    merchant_id     text PRIMARY KEY CHECK (merchant_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name            text NOT NULL,
    licence_number  text NOT NULL,
    status          text NOT NULL CHECK (status IN ('ACTIVE', 'SUSPENDED')),
    -- Categories the merchant may sell under subsidy; empty means every category.
    categories      text[] NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE terminals (
    terminal_id  text PRIMARY KEY CHECK (terminal_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    merchant_id  text NOT NULL REFERENCES merchants (merchant_id),
    status       text NOT NULL CHECK (status IN ('ACTIVE', 'SUSPENDED')),
    -- The HMAC credential issued when the terminal was loaded. The security issue moves
    -- this to an encrypted column or an HSM; the wire contract does not change.
    secret       text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
