-- Bill reconciliation with the payment channel (issue 12, section 3).
--
-- Capture and Refund carry the payment channel's transaction id (the acquirer's or wallet's
-- reference); the ledger keeps it with the event. A channel's settlement file for one business
-- day is matched against the captures and refunds of that day: a run (reconciliation_runs)
-- with one result line per file line and per ledger item the file lacks
-- (reconciliation_lines). Runs and their lines are never deleted: importing the same file
-- again changes nothing, a corrected file for the same channel and day supersedes the current
-- run, which stays (superseded_at, superseded_by_run_id) as history.

-- NULL: the capture or refund gave none (and every other event type).
ALTER TABLE ledger_events ADD COLUMN channel_reference text;

-- Matching reads one day's captures and refunds by time.
CREATE INDEX ledger_events_settled ON ledger_events (occurred_at)
    WHERE event_type IN ('CAPTURED', 'REFUNDED');

CREATE TABLE reconciliation_runs (
    run_id                   uuid PRIMARY KEY,
    channel                  text NOT NULL,
    business_date            date NOT NULL,
    file_name                text NOT NULL,
    file_sha256              text NOT NULL,
    mapping_name             text NOT NULL,
    mapping                  jsonb NOT NULL,          -- the column mapping the file was read with
    mode                     text NOT NULL CHECK (mode IN ('ALL_OR_NOTHING', 'GOOD_LINES')),
    request_id               text NOT NULL UNIQUE,    -- the import's request id
    imported_by              text NOT NULL,           -- the operator
    imported_at              timestamptz NOT NULL DEFAULT now(),
    day_starts_at            timestamptz NOT NULL,    -- the ledger window matched
    day_ends_at              timestamptz NOT NULL,
    file_lines               bigint NOT NULL,
    ignored_lines            bigint NOT NULL,
    ledger_items             bigint NOT NULL,
    channel_net_subsidy_fen  bigint NOT NULL,
    ledger_net_subsidy_fen   bigint NOT NULL,
    -- {"STATUS": [lines, sum of difference_fen]} for every status with a line.
    counts                   jsonb NOT NULL,
    -- Deferred: a run's lines and the run it supersedes are written before the run itself.
    supersedes_run_id        uuid REFERENCES reconciliation_runs (run_id) DEFERRABLE INITIALLY DEFERRED,
    superseded_at            timestamptz,
    superseded_by_run_id     uuid REFERENCES reconciliation_runs (run_id) DEFERRABLE INITIALLY DEFERRED,
    CHECK ((superseded_at IS NULL) = (superseded_by_run_id IS NULL))
);
-- One current run per channel and day.
CREATE UNIQUE INDEX reconciliation_runs_current ON reconciliation_runs (channel, business_date)
    WHERE superseded_at IS NULL;
CREATE INDEX reconciliation_runs_date ON reconciliation_runs (business_date, channel);

CREATE TABLE reconciliation_lines (
    run_id                    uuid NOT NULL REFERENCES reconciliation_runs (run_id) DEFERRABLE INITIALLY DEFERRED,
    position                  bigint NOT NULL,        -- file order; then ledger-only items
    status                    text NOT NULL CHECK (status IN ('MATCHED', 'AMOUNT_MISMATCH',
                                  'MISSING_IN_LEDGER', 'MISSING_IN_CHANNEL', 'DUPLICATE_IN_FILE', 'BAD_LINE')),
    kind                      text NOT NULL CHECK (kind IN ('PAYMENT', 'REFUND', '')),
    line_number               bigint NOT NULL,        -- 0: a ledger item the file lacks
    channel_txn_id            text NOT NULL,
    authorization_id          text NOT NULL,
    ledger_event_id           text NOT NULL,          -- '' when the ledger has none
    ledger_channel_reference  text NOT NULL,
    merchant_id               text NOT NULL,
    channel_subsidy_fen       bigint NOT NULL,
    ledger_subsidy_fen        bigint NOT NULL,
    channel_order_fen         bigint NOT NULL,
    ledger_order_fen          bigint NOT NULL,
    difference_fen            bigint NOT NULL,
    order_difference_fen      bigint NOT NULL,
    channel_time              timestamptz,
    ledger_time               timestamptz,
    error                     text NOT NULL,
    PRIMARY KEY (run_id, position)
);
CREATE INDEX reconciliation_lines_exceptions ON reconciliation_lines (run_id, position)
    WHERE status <> 'MATCHED';

-- Results are history: lines never change; a run changes once, when it is superseded.
CREATE FUNCTION reconciliation_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'reconciliation results are kept as they are: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE FUNCTION reconciliation_run_superseded_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.superseded_at IS NULL AND NEW.superseded_at IS NOT NULL
        AND (to_jsonb(NEW) - 'superseded_at' - 'superseded_by_run_id')
            = (to_jsonb(OLD) - 'superseded_at' - 'superseded_by_run_id') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'reconciliation runs are kept as they are (only superseded once): % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER reconciliation_runs_kept BEFORE UPDATE OR DELETE ON reconciliation_runs
    FOR EACH ROW EXECUTE FUNCTION reconciliation_run_superseded_only();
CREATE TRIGGER reconciliation_lines_kept BEFORE UPDATE OR DELETE ON reconciliation_lines
    FOR EACH ROW EXECUTE FUNCTION reconciliation_refuse_change();
CREATE TRIGGER reconciliation_runs_no_truncate BEFORE TRUNCATE ON reconciliation_runs
    FOR EACH STATEMENT EXECUTE FUNCTION reconciliation_refuse_change();
CREATE TRIGGER reconciliation_lines_no_truncate BEFORE TRUNCATE ON reconciliation_lines
    FOR EACH STATEMENT EXECUTE FUNCTION reconciliation_refuse_change();
