-- Offline risk detection's cases (issue 14, section 2): one row per finding of a detector
-- (server/domain/risk_detection.py) over a window of the ledger, worked by the risk team
-- NEW -> REVIEWING -> CONFIRMED / DISMISSED (NEW may be dismissed at once). Every change is
-- also an operator action in operator_actions (the audit trail); this row is the current state.
CREATE TABLE risk_cases (
    case_id       bigserial PRIMARY KEY,
    detector      text NOT NULL CHECK (detector IN
                      ('CAPPED_SHARE', 'THRESHOLD_CLUSTER', 'TERMINAL_BURST', 'IMPOSSIBLE_TRAVEL', 'LATE_REFUND')),
    subject_kind  text NOT NULL CHECK (subject_kind IN ('MERCHANT', 'TERMINAL', 'CONSUMER')),
    subject_id    text NOT NULL,
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    score         double precision NOT NULL,
    evidence      jsonb NOT NULL,
    -- detector | subject | scope | window: the same finding over the same window is one case,
    -- however often the detector runs (the daily job, an operator's re-run).
    dedup_key     text NOT NULL UNIQUE,
    state         text NOT NULL DEFAULT 'NEW' CHECK (state IN ('NEW', 'REVIEWING', 'CONFIRMED', 'DISMISSED')),
    assignee      text NOT NULL DEFAULT '',
    note          text NOT NULL DEFAULT '' CHECK (length(note) <= 2000),
    detected_by   text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (window_end > window_start)
);
CREATE INDEX risk_cases_state ON risk_cases (state, case_id);
CREATE INDEX risk_cases_subject ON risk_cases (subject_kind, subject_id);

-- The detectors read a window of ledger events by time; without this index each detector
-- scans the whole ledger, which grows all year. One more B-tree insert per event for the writer.
CREATE INDEX ledger_events_occurred ON ledger_events (occurred_at);
