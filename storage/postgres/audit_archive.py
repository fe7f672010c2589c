"""What the audit archive reads (``subsidyctl audit export``; server/commands/audit.py writes it).

Everything is read in one REPEATABLE READ, read-only transaction (``snapshot``), so the chains,
the totals and the rows agree with each other although the writer keeps appending.

For each campaign the archive holds the contiguous run of its chain from the first to the last
entry that occurred in the window (a late entry of an earlier day written in between is kept,
so that the chain can be recomputed; the verifier counts only the window's entries in the
day totals), with the hash before the run (``prev_hash``) and the hash at its end.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import orjson

from server.domain.posting import GENESIS_HASH
from storage.postgres.ledger import to_ms


@dataclass(frozen=True)
class ChainRange:
    campaign_id: str
    first_seq: int
    last_seq: int
    prev_hash: str  # the hash of entry first_seq - 1 (the genesis hash when first_seq is 1)
    last_hash: str
    ledger_head_seq: int  # the chain's head in the ledger at export
    ledger_head_hash: str


@asynccontextmanager
async def snapshot(connection: asyncpg.Connection) -> AsyncIterator[None]:
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        yield


async def chain_ranges(connection: asyncpg.Connection, start: datetime, end: datetime) -> list[ChainRange]:
    rows = await connection.fetch(
        "WITH ranges AS (SELECT campaign_id, min(entry_seq) AS first_seq, max(entry_seq) AS last_seq"
        " FROM ledger_entries WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY campaign_id)"
        " SELECT r.campaign_id, r.first_seq, r.last_seq,"
        " (SELECT entry_hash FROM ledger_entries AS e WHERE e.campaign_id = r.campaign_id"
        "  AND e.entry_seq = r.first_seq - 1) AS prev_hash,"
        " (SELECT entry_hash FROM ledger_entries AS e WHERE e.campaign_id = r.campaign_id"
        "  AND e.entry_seq = r.last_seq) AS last_hash,"
        " h.last_seq AS head_seq, h.last_hash AS head_hash"
        " FROM ranges AS r LEFT JOIN ledger_chain_heads AS h USING (campaign_id) ORDER BY r.campaign_id",
        start,
        end,
    )
    return [
        ChainRange(
            campaign_id=row["campaign_id"],
            first_seq=int(row["first_seq"]),
            last_seq=int(row["last_seq"]),
            # An entry before the first that is missing is the verifier's to find: the
            # first entry's prev_hash will not match the genesis hash.
            prev_hash=row["prev_hash"] or GENESIS_HASH,
            last_hash=row["last_hash"],
            ledger_head_seq=int(row["head_seq"] or 0),
            ledger_head_hash=row["head_hash"] or "",
        )
        for row in rows
    ]


async def entries(connection: asyncpg.Connection, chain: ChainRange) -> AsyncIterator[dict[str, Any]]:
    async for row in connection.cursor(
        "SELECT campaign_id, entry_seq, event_id, event_type, authorization_id, category, account, merchant_id,"
        " debit_fen, credit_fen, occurred_at, prev_hash, entry_hash FROM ledger_entries"
        " WHERE campaign_id = $1 AND entry_seq BETWEEN $2 AND $3 ORDER BY entry_seq",
        chain.campaign_id,
        chain.first_seq,
        chain.last_seq,
        prefetch=2000,
    ):
        entry = dict(row)
        entry["occurred_ms"] = to_ms(row["occurred_at"])
        entry["occurred_at"] = row["occurred_at"].isoformat()
        yield entry


async def events(
    connection: asyncpg.Connection, start: datetime, end: datetime, chains: Sequence[ChainRange]
) -> AsyncIterator[dict[str, Any]]:
    """The events of the exported entries and every event of the window (those that post
    nothing included), in stream order."""
    async for row in connection.cursor(
        "WITH ranges AS (SELECT * FROM unnest($3::text[], $4::bigint[], $5::bigint[])"
        "  AS r (campaign_id, first_seq, last_seq)),"
        " ids AS (SELECT DISTINCT e.event_id FROM ledger_entries AS e JOIN ranges AS r"
        "  ON e.campaign_id = r.campaign_id AND e.entry_seq BETWEEN r.first_seq AND r.last_seq)"
        " SELECT event_id, event_ms, event_seq, event_type, authorization_id, campaign_id, merchant_id,"
        " terminal_id, consumer_key, request_id, amount_fen, occurred_at, payload, written_at"
        " FROM ledger_events WHERE event_id IN (SELECT event_id FROM ids)"
        " OR (occurred_at >= $1 AND occurred_at < $2) ORDER BY event_ms, event_seq",
        start,
        end,
        [chain.campaign_id for chain in chains],
        [chain.first_seq for chain in chains],
        [chain.last_seq for chain in chains],
        prefetch=2000,
    ):
        event = dict(row)
        event["occurred_ms"] = to_ms(row["occurred_at"])
        event["occurred_at"] = row["occurred_at"].isoformat()
        event["written_at"] = row["written_at"].isoformat()
        event["payload"] = orjson.loads(row["payload"])
        yield event


async def day_totals(
    connection: asyncpg.Connection, days: Sequence[tuple[date, datetime, datetime]]
) -> dict[str, dict[str, dict[str, int]]]:
    """Per business day and campaign: entries, debits, credits, captured (debits to
    MERCHANT_RECEIVABLE), refunded (its credits by refunds) and, only when there are any,
    clawed_back_fen (its credits by claw-backs: an archive of days without claw-backs reads as
    it did before they existed), summed by the database."""
    rows = await connection.fetch(
        "SELECT d.day, e.campaign_id, count(*) AS entries, sum(e.debit_fen) AS debit_fen,"
        " sum(e.credit_fen) AS credit_fen,"
        " coalesce(sum(e.debit_fen) FILTER (WHERE e.account = 'MERCHANT_RECEIVABLE'), 0) AS captured_fen,"
        " coalesce(sum(e.credit_fen) FILTER (WHERE e.account = 'MERCHANT_RECEIVABLE'"
        " AND e.event_type <> 'CLAWED_BACK'), 0) AS refunded_fen,"
        " coalesce(sum(e.credit_fen) FILTER (WHERE e.account = 'MERCHANT_RECEIVABLE'"
        " AND e.event_type = 'CLAWED_BACK'), 0) AS clawed_back_fen"
        " FROM unnest($1::date[], $2::timestamptz[], $3::timestamptz[]) AS d (day, starts, ends)"
        " JOIN ledger_entries AS e ON e.occurred_at >= d.starts AND e.occurred_at < d.ends"
        " GROUP BY d.day, e.campaign_id ORDER BY d.day, e.campaign_id",
        [day for day, _, _ in days],
        [start for _, start, _ in days],
        [end for _, _, end in days],
    )
    totals: dict[str, dict[str, dict[str, int]]] = {}
    for row in rows:
        figures = {
            name: int(row[name]) for name in ("entries", "debit_fen", "credit_fen", "captured_fen", "refunded_fen")
        }
        if row["clawed_back_fen"]:
            figures["clawed_back_fen"] = int(row["clawed_back_fen"])
        totals.setdefault(row["day"].isoformat(), {})[row["campaign_id"]] = figures
    return totals


async def operator_actions(
    connection: asyncpg.Connection, start: datetime, end: datetime
) -> AsyncIterator[dict[str, Any]]:
    """Who changed what, when: the operator audit trail of the window."""
    async for row in connection.cursor(
        "SELECT * FROM operator_actions WHERE acted_at >= $1 AND acted_at < $2 ORDER BY action_id",
        start,
        end,
        prefetch=1000,
    ):
        yield _plain(row, ("details",))


async def has_daily_reports(connection: asyncpg.Connection) -> bool:
    return bool(await connection.fetchval("SELECT to_regclass('daily_reports') IS NOT NULL"))


REPORT_TABLES = ("daily_reports", "daily_report_budgets", "daily_report_rows")


async def report_rows(
    connection: asyncpg.Connection, table: str, first: date, last: date
) -> AsyncIterator[dict[str, Any]]:
    """The published daily reports of [first, last]: headers, budget lines or rows."""
    if table not in REPORT_TABLES:
        raise ValueError(table)
    order = "business_date" if table == "daily_reports" else "business_date, position"
    async for row in connection.cursor(
        f"SELECT * FROM {table} WHERE business_date BETWEEN $1 AND $2 ORDER BY {order}",
        first,
        last,
        prefetch=2000,
    ):
        yield _plain(row, ("chain_heads",))


async def has_reconciliation(connection: asyncpg.Connection) -> bool:
    return bool(await connection.fetchval("SELECT to_regclass('reconciliation_runs') IS NOT NULL"))


async def reconciliation_runs(connection: asyncpg.Connection, first: date, last: date) -> AsyncIterator[dict[str, Any]]:
    """Every bill reconciliation run of the business days [first, last], superseded ones too."""
    async for row in connection.cursor(
        "SELECT * FROM reconciliation_runs WHERE business_date BETWEEN $1 AND $2"
        " ORDER BY business_date, channel, imported_at, run_id",
        first,
        last,
        prefetch=1000,
    ):
        yield _plain(row, ("mapping", "counts"))


async def reconciliation_lines(
    connection: asyncpg.Connection, first: date, last: date
) -> AsyncIterator[dict[str, Any]]:
    """Those runs' result lines, run by run in position order."""
    async for row in connection.cursor(
        "SELECT line.* FROM reconciliation_lines AS line JOIN reconciliation_runs AS run USING (run_id)"
        " WHERE run.business_date BETWEEN $1 AND $2"
        " ORDER BY run.business_date, run.channel, run.imported_at, run.run_id, line.position",
        first,
        last,
        prefetch=5000,
    ):
        yield _plain(row, ())


def _plain(row: asyncpg.Record, json_columns: Sequence[str]) -> dict[str, Any]:
    """A row as JSON values: instants and dates as ISO-8601, jsonb columns parsed."""
    plain: dict[str, Any] = {}
    for name, value in row.items():
        if name in json_columns and isinstance(value, str):
            plain[name] = orjson.loads(value)
        elif isinstance(value, datetime | date):
            plain[name] = value.isoformat()
        elif isinstance(value, uuid.UUID):
            plain[name] = str(value)
        else:
            plain[name] = value
    return plain
