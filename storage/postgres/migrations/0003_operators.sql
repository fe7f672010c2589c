-- Operators: the payment institution's staff and the bureau's auditors, who call the
-- reporting (and later the operator) services with their own credentials.
CREATE TABLE operators (
    operator_id  text PRIMARY KEY CHECK (operator_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name         text NOT NULL,
    status       text NOT NULL CHECK (status IN ('ACTIVE', 'SUSPENDED')),
    secret       text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
