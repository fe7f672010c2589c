-- Claw-backs (issue 14, section 2; README "Claw-back") and complaint counts in the T+1 report
-- (issue 14, section 3).
--
-- A claw-back reverses the subsidy of captured lines of a fraudulent sale, on a CONFIRMED risk
-- case: one CLAWED_BACK ledger event (clawback.lua), posted as debit RECOVERED, credit
-- MERCHANT_RECEIVABLE. The merchant is no longer owed the subsidy; the money is recovered
-- public money, not returned to AVAILABLE, so it cannot be granted again by a later payment.
ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_event_type_check;
ALTER TABLE ledger_events ADD CONSTRAINT ledger_events_event_type_check
    CHECK (event_type IN ('AUTHORIZED', 'CAPTURED', 'VOIDED', 'EXPIRED', 'REFUNDED', 'CLAWED_BACK'));
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_account_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_account_check
    CHECK (account IN ('AVAILABLE', 'PENDING', 'MERCHANT_RECEIVABLE', 'RECOVERED'));

-- Daily reports of format 2 (server/domain/daily_report.py): the claw-backs of the day per
-- merchant row and per budget, the recovered balance, and the complaints desk's counts of the
-- day. Reports published before this migration are format 1: these columns read 0 for them and
-- their content hash covers exactly what it covered when they were published.
ALTER TABLE daily_report_rows
    ADD COLUMN clawbacks bigint NOT NULL DEFAULT 0,             -- claw-back events
    ADD COLUMN clawed_back_fen bigint NOT NULL DEFAULT 0;       -- 追回金额: subsidy clawed back
ALTER TABLE daily_report_budgets
    ADD COLUMN clawed_back_fen bigint NOT NULL DEFAULT 0,
    ADD COLUMN opening_recovered_fen bigint NOT NULL DEFAULT 0,
    ADD COLUMN closing_recovered_fen bigint NOT NULL DEFAULT 0,
    ADD COLUMN chain_recovered_fen bigint NOT NULL DEFAULT 0;
ALTER TABLE daily_reports
    ADD COLUMN tickets_opened bigint NOT NULL DEFAULT 0,        -- opened during the day
    ADD COLUMN tickets_resolved bigint NOT NULL DEFAULT 0,      -- closed RESOLVED or REJECTED during the day
    ADD COLUMN tickets_overdue bigint NOT NULL DEFAULT 0;       -- open at the day's end and past a deadline then
