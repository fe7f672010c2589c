-- A risk case's claw-backs are read from the ledger itself (GetRiskCase, subsidyctl risk show):
-- the CLAWED_BACK events carry their case in payload->>'risk_case'. A partial index for that
-- lookup: it holds the claw-back events only, so it stays small however large the ledger grows.
CREATE INDEX ledger_events_risk_case ON ledger_events ((payload->>'risk_case')) WHERE event_type = 'CLAWED_BACK';
