-- Qualifications (issue 6): how many a category issues and when, the location rules of a
-- claim, and the credentials of partner consumer apps and of the other service providers.

-- Location rules of a claim: the largest accepted accuracy radius and the oldest accepted fix.
ALTER TABLE campaigns
    ADD COLUMN location_max_accuracy_m integer NOT NULL DEFAULT 100 CHECK (location_max_accuracy_m > 0),
    ADD COLUMN location_max_age_s integer NOT NULL DEFAULT 300 CHECK (location_max_age_s > 0);

-- The category's qualification quota (0 when the campaign issues none) and its release
-- schedule: [{"release_at": ISO-8601, "count": n}, ...]; without tranches the whole quota is
-- released when the campaign starts.
ALTER TABLE campaign_rules
    ADD COLUMN qualification_quota bigint NOT NULL DEFAULT 0 CHECK (qualification_quota >= 0),
    ADD COLUMN qualification_tranches jsonb NOT NULL DEFAULT '[]'::jsonb;

-- Partner consumer apps (APP: QualificationService) and other service providers (PROVIDER:
-- ExchangeService). They share the credential namespace of terminals and operators.
CREATE TABLE partners (
    partner_id  text PRIMARY KEY CHECK (partner_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('APP', 'PROVIDER')),
    status      text NOT NULL CHECK (status IN ('ACTIVE', 'SUSPENDED')),
    secret      text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
