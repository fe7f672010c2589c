-- T+1 daily statistics (issue 12, section 1) and the bureau's roles.
--
-- A business day's report is cut from the ledger once, after the day's cut-off, and then never
-- changes: its header (daily_reports), its budget lines (daily_report_budgets) and its rows
-- (daily_report_rows) are append-only like the ledger itself. The header records the ledger
-- chain head of every campaign the report was cut from (what it saw) and the SHA-256 of its
-- content, chained to the previous day's report. An event the ledger receives after that cut
-- for an earlier day is not folded back into the closed day: it appears in the next report as
-- an adjustment (storage/postgres/daily_reports.py, server/domain/daily_report.py).

-- The staff credentials of the reference file: the provider's operators, the bureau's
-- read-only government users (reports; later the live stream, the dashboard and the archive)
-- and its auditors (the audit archive only). Every service admits the roles it names.
ALTER TABLE operators ADD COLUMN role text NOT NULL DEFAULT 'operator'
    CHECK (role IN ('operator', 'government', 'auditor'));

-- Cutting a day reads that day's entries by time. (A lock on writes while it builds: applied
-- at start by the writer and the reference commands, before either writes.)
CREATE INDEX ledger_entries_occurred ON ledger_entries (occurred_at);

CREATE TABLE daily_reports (
    business_date    date PRIMARY KEY,
    timezone         text NOT NULL,               -- the business day's calendar, e.g. Asia/Shanghai
    cutoff           text NOT NULL,               -- HH:MM after the day's end when it closes
    day_starts_at    timestamptz NOT NULL,
    day_ends_at      timestamptz NOT NULL,
    cut_at           timestamptz NOT NULL,        -- when the report was cut
    published_by     text NOT NULL,               -- 'scheduler' or the operator who asked
    previous_date    date,                        -- the report it continues (its closing = this opening)
    previous_hash    text NOT NULL,
    -- The ledger it was cut from: {campaign_id: {"seq": last entry_seq, "hash": its entry_hash}}.
    -- Entries up to these sequence numbers are in this report or an earlier one; later ones
    -- (whatever their event time) go to a later report.
    chain_heads      jsonb NOT NULL,
    budget_count     integer NOT NULL,
    row_count        integer NOT NULL,
    adjustment_rows  integer NOT NULL,
    format_version   integer NOT NULL,
    content_hash     text NOT NULL UNIQUE,
    CHECK (day_ends_at > day_starts_at)
);

-- One line per campaign budget (campaign x category): the spent and held balances at the
-- day's opening and closing, and the day's movements; opening + captured - refunded = closing.
CREATE TABLE daily_report_budgets (
    business_date      date NOT NULL,
    position           integer NOT NULL,
    campaign_id        text NOT NULL,
    campaign_name      text NOT NULL,
    category           text NOT NULL,
    budget_fen         bigint NOT NULL,
    released_fen       bigint NOT NULL,
    opening_spent_fen  bigint NOT NULL,
    captured_fen       bigint NOT NULL,
    refunded_fen       bigint NOT NULL,
    closing_spent_fen  bigint NOT NULL,
    opening_held_fen   bigint NOT NULL,
    held_fen           bigint NOT NULL,
    released_hold_fen  bigint NOT NULL,
    closing_held_fen   bigint NOT NULL,
    remaining_fen      bigint NOT NULL,
    -- The balances of the whole chain up to the report's chain head (events after the day
    -- included): what the next report starts its independent closing computation from.
    chain_spent_fen    bigint NOT NULL,
    chain_held_fen     bigint NOT NULL,
    PRIMARY KEY (business_date, position),
    UNIQUE (business_date, campaign_id, category)
);

-- The statistics: one row per campaign x category x merchant with activity, a total per
-- campaign x category and a district total, for the day (kind DAY) and for late events of
-- earlier days (kind ADJUSTMENT, original_date naming their day).
CREATE TABLE daily_report_rows (
    business_date  date NOT NULL,
    position       integer NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('DAY', 'ADJUSTMENT')),
    level          text NOT NULL CHECK (level IN ('MERCHANT', 'CATEGORY_TOTAL', 'DISTRICT_TOTAL')),
    original_date  date,
    campaign_id    text NOT NULL,                 -- '' on a district total
    campaign_name  text NOT NULL,
    category       text NOT NULL,                 -- '' on a district total
    merchant_id    text NOT NULL,                 -- '' on a total
    merchant_name  text NOT NULL,
    consumers      bigint NOT NULL,               -- distinct consumer keys with a sale
    sales          bigint NOT NULL,               -- captured payments (with a line in the category)
    units          bigint NOT NULL,               -- captured lines
    redeemed_fen   bigint NOT NULL,               -- 核销金额: subsidy captured
    order_fen      bigint NOT NULL,               -- 订单金额: price of the captured lines
    refunds        bigint NOT NULL,               -- refund events
    refunded_fen   bigint NOT NULL,               -- 核销退款金额: subsidy refunded
    merchants      bigint NOT NULL,               -- 核销商家数: distinct merchants with a sale
    PRIMARY KEY (business_date, position)
);
CREATE INDEX daily_report_rows_merchant ON daily_report_rows (merchant_id, business_date);

CREATE TRIGGER daily_reports_append_only BEFORE UPDATE OR DELETE ON daily_reports
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER daily_reports_no_truncate BEFORE TRUNCATE ON daily_reports
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER daily_report_budgets_append_only BEFORE UPDATE OR DELETE ON daily_report_budgets
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER daily_report_budgets_no_truncate BEFORE TRUNCATE ON daily_report_budgets
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER daily_report_rows_append_only BEFORE UPDATE OR DELETE ON daily_report_rows
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER daily_report_rows_no_truncate BEFORE TRUNCATE ON daily_report_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
