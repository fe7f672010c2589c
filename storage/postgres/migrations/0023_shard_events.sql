-- The Redis Cluster shards' money events (issue 16, docs/scale-out.md 2.3): every entry of every
-- shard's ledger stream lands here exactly once. Keyed by (stream, entry id): an entry id is
-- unique within its stream only, and two shards on two primaries write the same ids in the
-- same millisecond. Events as the escrow scripts emit them (storage/redis/cluster/lua):
-- SHARD_FUNDED, RESERVED, TRANSFER_OUT, TRANSFER_IN. They are not posted to ledger_entries yet:
-- that comes with the authorize script on the cluster.
CREATE TABLE shard_events (
    stream       text NOT NULL,
    entry_id     text NOT NULL,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,        -- the entry's fields as written
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);
CREATE TRIGGER shard_events_append_only BEFORE UPDATE OR DELETE ON shard_events
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER shard_events_no_truncate BEFORE TRUNCATE ON shard_events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
