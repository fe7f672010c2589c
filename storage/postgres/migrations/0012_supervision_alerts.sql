-- Live fund supervision's alerts (issue 12, section 2; server/domain/supervision.py, README
-- "Live supervision"). Each alert is raised once: its alert_key names what it is about
-- (BUDGET_THRESHOLD:<campaign>:<category>:<percent>, MERCHANT_SURGE:<merchant>:<business date>)
-- and is unique, so several gateway processes noticing the same crossing at once insert it
-- with ON CONFLICT DO NOTHING and one row results. Append-only, like the ledger.
CREATE TABLE supervision_alerts (
    alert_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_key          text NOT NULL UNIQUE CHECK (char_length(alert_key) BETWEEN 1 AND 200),
    kind               text NOT NULL CHECK (kind IN ('BUDGET_THRESHOLD', 'MERCHANT_SURGE')),
    campaign_id        text NOT NULL DEFAULT '',
    category           text NOT NULL DEFAULT '',
    merchant_id        text NOT NULL DEFAULT '',
    threshold_percent  integer NOT NULL DEFAULT 0 CHECK (threshold_percent BETWEEN 0 AND 100),
    observed           double precision NOT NULL,
    baseline           double precision NOT NULL,
    message            text NOT NULL CHECK (char_length(message) BETWEEN 1 AND 500),
    raised_at          timestamptz NOT NULL,
    -- The business day (report time zone and calendar) the alert belongs to, for the daily report.
    business_date      date NOT NULL,
    raised_by          text NOT NULL DEFAULT '',
    CHECK ((kind = 'BUDGET_THRESHOLD') = (threshold_percent > 0 AND campaign_id <> '' AND category <> '')),
    CHECK ((kind = 'MERCHANT_SURGE') = (merchant_id <> ''))
);
CREATE INDEX supervision_alerts_raised ON supervision_alerts (raised_at);
CREATE INDEX supervision_alerts_day ON supervision_alerts (business_date, alert_id);

CREATE TRIGGER supervision_alerts_append_only BEFORE UPDATE OR DELETE ON supervision_alerts
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

-- The surge detector's baseline: one merchant's captures over the trailing days, found by
-- merchant and time rather than by scanning a week of every merchant's events.
CREATE INDEX ledger_events_merchant_captures ON ledger_events (merchant_id, occurred_at)
    WHERE event_type = 'CAPTURED';
