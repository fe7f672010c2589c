"""Writing ledger events to PostgreSQL, exactly once, in one transaction per batch.

``write_batch`` inserts the batch's events with ``ON CONFLICT (event_id) DO NOTHING``; only the
events that were new are posted (double entry, hash-chained per campaign), applied to the
authorizations table and recorded as long-lived idempotency records. A redelivered batch
therefore changes nothing, whatever point a previous writer died at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import orjson

from server.domain.posting import GENESIS_HASH, entry_hash, postings
from storage.redis.contract import LedgerEventRecord

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MalformedEvent(ValueError):
    """A stream entry that cannot be a ledger event; it goes to the dead-letter stream."""


class EventCollision(Exception):
    """An event whose id is already in the ledger with different content (a stream id reused,
    e.g. after a Redis loss without ``rebuild``): never silently treated as a redelivery."""


# Separates a stream entry id from the shard it was read in: "<ms>-<seq>@<shard>" (see LedgerEvent).
SHARD_SEPARATOR = "@"


@dataclass(frozen=True)
class LedgerEvent:
    """One stream entry's event: ``payload`` as the script wrote it (stored, and digested into
    the chain, as it is), ``record`` the same decoded into named fields (storage/redis/contract.py).
    Raises msgspec.ValidationError when the payload is no ledger event.

    ``event_id`` is the stream entry id ``<ms>-<seq>`` on one Redis. A consumer shard's
    (Redis Cluster, storage/redis/cluster/shards.py) is ``<ms>-<seq>@<shard>``: two shards'
    primaries can hand out the same entry id, and the ledger must not take the second event for
    a redelivery of the first (or an EventCollision)."""

    event_id: str
    payload: dict[str, Any]
    record: LedgerEventRecord = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "record", msgspec.convert(self.payload, LedgerEventRecord))

    @property
    def entry_id(self) -> str:
        """The id of the stream entry it was read from (what XACK and XPENDING name)."""
        return self.event_id.partition(SHARD_SEPARATOR)[0]

    @property
    def order(self) -> tuple[int, int]:
        """(ms, seq) of its entry: the order of one stream, hence of one authorization's events
        (an authorization lives in one shard)."""
        milliseconds, sequence = self.entry_id.split("-")
        return int(milliseconds), int(sequence)


def parse_event(entry_id: bytes | str, fields: dict[bytes, bytes], shard: str = "") -> LedgerEvent:
    """The event of a stream entry; ``shard`` names the consumer shard whose stream it was read
    from ("" on one Redis), qualifying its event id."""
    entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    event_id = f"{entry}{SHARD_SEPARATOR}{shard}" if shard else entry
    try:
        payload = orjson.loads(fields[b"e"])
    except (KeyError, orjson.JSONDecodeError) as error:
        raise MalformedEvent(f"{event_id}: no JSON payload") from error
    if not isinstance(payload, dict):
        raise MalformedEvent(f"{event_id}: not a JSON object")
    try:
        # Every field the ledger needs, of its type; each line's category, subsidy (>= 0),
        # GTIN and serial ("" when none).
        return LedgerEvent(event_id, payload)
    except msgspec.ValidationError as error:
        raise MalformedEvent(f"{event_id}: {error}") from error


def payload_digest(payload: dict[str, Any]) -> str:
    """A canonical digest of an event's content (sorted keys), chained into its ledger entries so
    that altering an event row is as detectable as altering an entry."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def from_ms(milliseconds: int) -> datetime:
    return EPOCH + timedelta(milliseconds=milliseconds)


def to_ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class BatchResult:
    new_events: int
    duplicates: int  # events already in PostgreSQL (a redelivery)
    reused_request_ids: int  # actions whose request id had acted before (see duplicate_requests)


async def write_batch(connection: asyncpg.Connection, events: Sequence[LedgerEvent]) -> BatchResult:
    """Writes a batch in one transaction; safe to call again with any of the same events."""
    ordered = sorted(events, key=lambda event: event.order)
    async with connection.transaction():
        inserted = await _insert_events(connection, ordered)
        await _check_redeliveries(connection, [event for event in ordered if event.event_id not in inserted])
        new = [event for event in ordered if event.event_id in inserted]
        if new:
            await _post_entries(connection, new)
            await _apply_authorizations(connection, new)
            reused = await _record_idempotency(connection, new)
        else:
            reused = 0
    return BatchResult(new_events=len(new), duplicates=len(ordered) - len(new), reused_request_ids=reused)


async def _insert_events(connection: asyncpg.Connection, events: Sequence[LedgerEvent]) -> set[str]:
    columns: list[list[Any]] = [[] for _ in range(15)]
    for event in events:
        payload, record = event.payload, event.record
        milliseconds, sequence = event.order
        values = (
            event.event_id,
            milliseconds,
            sequence,
            record.type,
            record.authorization_id,
            record.campaign_id,
            record.merchant_id,
            record.terminal_id,
            record.consumer_key,
            record.request_id,
            record.amount_fen,
            from_ms(record.at_ms),
            orjson.dumps(payload["lines"]).decode(),
            orjson.dumps(payload).decode(),
            record.channel_reference or None,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    rows = await connection.fetch(
        "INSERT INTO ledger_events (event_id, event_ms, event_seq, event_type, authorization_id, campaign_id,"
        " merchant_id, terminal_id, consumer_key, request_id, amount_fen, occurred_at, lines, payload,"
        " channel_reference)"
        " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[],"
        " $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::timestamptz[], $13::jsonb[],"
        " $14::jsonb[], $15::text[]) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        *columns,
    )
    return {row["event_id"] for row in rows}


async def _check_redeliveries(connection: asyncpg.Connection, events: Sequence[LedgerEvent]) -> None:
    """An event id already written must carry the same content; otherwise it is a collision."""
    if not events:
        return
    rows = await connection.fetch(
        "SELECT event_id, payload FROM ledger_events WHERE event_id = ANY($1::text[])",
        [event.event_id for event in events],
    )
    stored = {row["event_id"]: payload_digest(orjson.loads(row["payload"])) for row in rows}
    for event in events:
        if stored.get(event.event_id) != payload_digest(event.payload):
            raise EventCollision(f"event id {event.event_id} is in the ledger with different content")


async def _post_entries(connection: asyncpg.Connection, events: Sequence[LedgerEvent]) -> None:
    campaigns = sorted({event.record.campaign_id for event in events})
    await connection.execute(
        "INSERT INTO ledger_chain_heads (campaign_id, last_seq, last_hash)"
        " SELECT unnest($1::text[]), 0, $2 ON CONFLICT (campaign_id) DO NOTHING",
        campaigns,
        GENESIS_HASH,
    )
    # Locked in a fixed order, so two writers never deadlock on each other's chains.
    heads = await connection.fetch(
        "SELECT campaign_id, last_seq, last_hash FROM ledger_chain_heads"
        " WHERE campaign_id = ANY($1::text[]) ORDER BY campaign_id FOR UPDATE",
        campaigns,
    )
    chain = {row["campaign_id"]: (int(row["last_seq"]), str(row["last_hash"])) for row in heads}
    records: list[tuple[Any, ...]] = []
    for event in events:
        record = event.record
        campaign_id, occurred_ms = record.campaign_id, record.at_ms
        for posting in postings(record.type, record.lines):
            seq, prev_hash = chain[campaign_id]
            seq += 1
            digest = entry_hash(
                prev_hash,
                campaign_id,
                seq,
                event.event_id,
                record.authorization_id,
                posting,
                record.merchant_id,
                occurred_ms,
                payload_digest(event.payload),
            )
            records.append(
                (
                    campaign_id,
                    seq,
                    event.event_id,
                    record.type,
                    record.authorization_id,
                    posting.category,
                    posting.account,
                    record.merchant_id,
                    posting.debit_fen,
                    posting.credit_fen,
                    from_ms(occurred_ms),
                    prev_hash,
                    digest,
                )
            )
            chain[campaign_id] = (seq, digest)
    if records:
        await connection.copy_records_to_table(
            "ledger_entries",
            records=records,
            columns=[
                "campaign_id",
                "entry_seq",
                "event_id",
                "event_type",
                "authorization_id",
                "category",
                "account",
                "merchant_id",
                "debit_fen",
                "credit_fen",
                "occurred_at",
                "prev_hash",
                "entry_hash",
            ],
        )
    await connection.execute(
        "UPDATE ledger_chain_heads AS head SET last_seq = new.seq, last_hash = new.hash"
        " FROM unnest($1::text[], $2::bigint[], $3::text[]) AS new(campaign_id, seq, hash)"
        " WHERE head.campaign_id = new.campaign_id",
        list(chain),
        [seq for seq, _ in chain.values()],
        [digest for _, digest in chain.values()],
    )


async def _apply_authorizations(connection: asyncpg.Connection, events: Sequence[LedgerEvent]) -> None:
    """Each event carries the authorization as it stood after it; the newest event wins, so the
    order in which redeliveries arrive does not matter."""
    rows = []
    for event in events:
        payload, record = event.payload, event.record
        milliseconds, sequence = event.order
        rows.append(
            (
                record.authorization_id,
                record.campaign_id,
                record.merchant_id,
                record.authorization_terminal or record.terminal_id,
                record.consumer_key,
                record.channel,
                record.state or record.type,
                record.total_fen,
                record.subsidy_fen,
                record.refunded_fen,
                orjson.dumps(payload.get("all_lines", payload["lines"])).decode(),
                from_ms(record.at_ms if record.created_ms is None else record.created_ms),
                from_ms(record.at_ms if record.expires_ms is None else record.expires_ms),
                from_ms(record.at_ms),
                milliseconds,
                sequence,
            )
        )
    await connection.executemany(
        "INSERT INTO authorizations (authorization_id, campaign_id, merchant_id, terminal_id, consumer_key,"
        " channel, state, total_price_fen, subsidy_fen, refunded_fen, lines, created_at, hold_expires_at,"
        " updated_at, last_event_ms, last_event_seq)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15, $16)"
        " ON CONFLICT (authorization_id) DO UPDATE SET state = excluded.state,"
        " refunded_fen = excluded.refunded_fen, lines = excluded.lines, updated_at = excluded.updated_at,"
        " last_event_ms = excluded.last_event_ms, last_event_seq = excluded.last_event_seq"
        " WHERE (authorizations.last_event_ms, authorizations.last_event_seq)"
        " < (excluded.last_event_ms, excluded.last_event_seq)",
        rows,
    )


async def _record_idempotency(connection: asyncpg.Connection, events: Sequence[LedgerEvent]) -> int:
    """Records (terminal, request id) for every acting event; returns how many request ids had
    already acted before, which are written to duplicate_requests for follow-up."""
    acting = [event for event in events if event.record.request_id]
    if not acting:
        return 0
    inserted = await connection.fetch(
        "INSERT INTO idempotency_records (terminal_id, request_id, payload_hash, event_type, authorization_id,"
        " event_id) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])"
        " ON CONFLICT (terminal_id, request_id) DO NOTHING RETURNING event_id",
        [event.record.terminal_id for event in acting],
        [event.record.request_id for event in acting],
        [event.record.payload_hash for event in acting],
        [event.record.type for event in acting],
        [event.record.authorization_id for event in acting],
        [event.event_id for event in acting],
    )
    recorded = {row["event_id"] for row in inserted}
    reused = [event for event in acting if event.event_id not in recorded]
    if reused:
        await connection.execute(
            "INSERT INTO duplicate_requests (event_id, terminal_id, request_id, authorization_id,"
            " first_authorization_id, resolution)"
            " SELECT new.event_id, new.terminal_id, new.request_id, new.authorization_id, first.authorization_id,"
            " 'RECORDED' FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
            " AS new(event_id, terminal_id, request_id, authorization_id)"
            " JOIN idempotency_records AS first USING (terminal_id, request_id)"
            " ON CONFLICT (event_id) DO NOTHING",
            [event.event_id for event in reused],
            [event.record.terminal_id for event in reused],
            [event.record.request_id for event in reused],
            [event.record.authorization_id for event in reused],
        )
    return len(reused)
