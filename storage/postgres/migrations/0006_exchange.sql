-- Cross-provider exchange (server/commands/exchange.py): what the other service providers of the
-- programme reported subsidising, from their signed daily files. Consumer keys and device
-- serials only; never an ID number, a name or an amount. This is the system of record for
-- those facts; Redis holds the copy the authorize script reads (`python -m server.exchange
-- reapply` rewrites it from here after a Redis loss).

-- Every file imported, once per distinct content: who sent it, for which day, what it held.
CREATE TABLE exchange_files (
    provider_id  text NOT NULL CHECK (provider_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    file_date    date NOT NULL,
    digest       text NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),  -- SHA-256 of the file's bytes
    consumers    integer NOT NULL CHECK (consumers >= 0),
    serials      integer NOT NULL CHECK (serials >= 0),
    imported_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, file_date, digest)
);

-- A consumer (by key) who used a category through another provider. One row per provider, so
-- re-importing a file, or a later file repeating the fact, adds nothing.
CREATE TABLE exchange_consumers (
    consumer_key  text NOT NULL CHECK (consumer_key ~ '^[0-9a-f]{64}$'),
    category      text NOT NULL CHECK (category ~ '^[a-z0-9_]{1,32}$'),
    provider_id   text NOT NULL,
    file_date     date NOT NULL,                    -- the day of the first file reporting it
    imported_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_key, category, provider_id)
);

-- A device serial (canonical upper case) subsidised through another provider.
CREATE TABLE exchange_serials (
    gtin         text NOT NULL CHECK (gtin ~ '^[0-9]{13}$'),
    serial       text NOT NULL CHECK (serial ~ '^[!-~]{1,64}$' AND serial = upper(serial)),
    provider_id  text NOT NULL,
    file_date    date NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gtin, serial, provider_id)
);

-- The daily export reads one day of captures; without this it would scan the whole ledger.
CREATE INDEX ledger_events_captured_at ON ledger_events (occurred_at) WHERE event_type = 'CAPTURED';
