"""T+1 daily reports in PostgreSQL: cutting a closed business day from the ledger, publishing it
once (append-only tables of migration 0010), and reading published reports back as streams.

The rules (what a day holds, what is late, the tie-outs, the content hash) are
server/domain/daily_report.py; this module runs them over SQL:

- ``publish_closed_days``: under an advisory lock (one publisher at a time, whichever process
  asks: the writer's scheduler or an operator's call), publishes every closed day after the
  last published one, in order, each in its own REPEATABLE READ transaction: the chain heads,
  the budget sums and the rows all come from one snapshot, and the report commits whole or not
  at all. A day already published is never cut again.
- The day's entries are found by time (index ``ledger_entries_occurred``), the adjustments by
  each campaign's sequence range since the previous cut (the primary key); the rows are
  aggregated in PostgreSQL (one row per campaign x category x merchant, and the totals, by
  GROUPING SETS) and streamed through a cursor into the report, checked and hashed on the
  way: the Python side holds one batch of rows at a time, never the day's events.
- ``header``, ``list_headers``, ``stream_budgets``, ``stream_rows``: the published reports,
  rows in stored order through a cursor (inside the caller's transaction: ``reading``).
- ``verify``: recomputes a stored report's content hash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from server.domain.daily_report import (
    ADJUSTMENT,
    AHEAD_PART,
    CATEGORY_TOTAL,
    DAY,
    DAY_PART,
    DISTRICT_TOTAL,
    LATE_PART,
    MERCHANT,
    RANGE_PART,
    BudgetLine,
    BusinessCalendar,
    ChainHead,
    ContentHasher,
    DayNotClosed,
    Figures,
    Flows,
    ReportHeader,
    ReportRow,
    RowChecker,
    Rule,
    budget_line,
    district_total,
)
from server.domain.posting import GENESIS_HASH
from storage.postgres.ledger import LedgerEvent, parse_event, write_batch

# An arbitrary constant naming the publisher's lock (storage/postgres/migrate.py uses another).
PUBLISH_LOCK_ID = 741_852_964
ROW_BATCH = 2_000
# The cut's sorts and hash aggregates (a day's captures, distinct consumers) stay in memory
# rather than spilling to disk: for this transaction only.
CUT_WORK_MEM = "256MB"
LEVEL_BY_GROUPING = {0: MERCHANT, 3: CATEGORY_TOTAL, 15: DISTRICT_TOTAL}

# The watermarks of the previous report (low) and of this cut (high), per campaign.
WATERMARK = "w AS (SELECT * FROM unnest($3::text[], $4::bigint[], $5::bigint[]) AS w(campaign_id, low, high))"

BUDGET_FLOWS = f"""
WITH {WATERMARK},
parts AS (
    SELECT '{DAY_PART}' AS part, e.campaign_id, e.category, e.account, e.event_type, e.debit_fen, e.credit_fen
    FROM ledger_entries AS e JOIN w USING (campaign_id)
    WHERE e.occurred_at >= $1 AND e.occurred_at < $2 AND e.entry_seq <= w.high AND e.account <> 'AVAILABLE'
    UNION ALL
    SELECT CASE WHEN e.occurred_at < $1 THEN '{LATE_PART}' ELSE '{RANGE_PART}' END, e.campaign_id, e.category,
        e.account, e.event_type, e.debit_fen, e.credit_fen
    FROM w JOIN ledger_entries AS e
        ON e.campaign_id = w.campaign_id AND e.entry_seq > w.low AND e.entry_seq <= w.high
    WHERE e.account <> 'AVAILABLE'
    UNION ALL
    SELECT '{AHEAD_PART}', e.campaign_id, e.category, e.account, e.event_type, e.debit_fen, e.credit_fen
    FROM ledger_entries AS e JOIN w USING (campaign_id)
    WHERE e.occurred_at >= $2 AND e.entry_seq <= w.high AND e.account <> 'AVAILABLE'
)
SELECT part, campaign_id, category, account, event_type,
    sum(debit_fen)::bigint AS debit, sum(credit_fen)::bigint AS credit
FROM parts GROUP BY part, campaign_id, category, account, event_type
"""

# Captures debit, refunds and claw-backs credit MERCHANT_RECEIVABLE: one entry per event and category.
ROWS = f"""
WITH {WATERMARK},
moved AS (
    SELECT '{DAY}'::text AS kind, NULL::date AS original_date, e.campaign_id, e.category, e.merchant_id,
        e.event_id, e.event_type, e.debit_fen, e.credit_fen
    FROM ledger_entries AS e JOIN w USING (campaign_id)
    WHERE e.occurred_at >= $1 AND e.occurred_at < $2 AND e.entry_seq <= w.high
        AND e.account = 'MERCHANT_RECEIVABLE'
    UNION ALL
    SELECT '{ADJUSTMENT}', (e.occurred_at AT TIME ZONE $6)::date, e.campaign_id, e.category, e.merchant_id,
        e.event_id, e.event_type, e.debit_fen, e.credit_fen
    FROM w JOIN ledger_entries AS e
        ON e.campaign_id = w.campaign_id AND e.entry_seq > w.low AND e.entry_seq <= w.high
    WHERE e.occurred_at < $1 AND e.account = 'MERCHANT_RECEIVABLE'
),
detailed AS (
    SELECT moved.*, event.consumer_key, priced.order_fen, priced.units
    FROM moved JOIN ledger_events AS event USING (event_id)
    CROSS JOIN LATERAL (
        SELECT coalesce(sum((line->>'p')::bigint), 0) AS order_fen, count(*) AS units
        FROM jsonb_array_elements(event.lines) AS line WHERE line->>'c' = moved.category
    ) AS priced
),
grouped AS (
    SELECT kind, campaign_id, category, merchant_id, original_date,
        GROUPING(campaign_id, category, merchant_id, original_date) AS rollup,
        count(DISTINCT consumer_key) FILTER (WHERE event_type = 'CAPTURED') AS consumers,
        count(*) FILTER (WHERE event_type = 'CAPTURED') AS sales,
        coalesce(sum(units) FILTER (WHERE event_type = 'CAPTURED'), 0)::bigint AS units,
        coalesce(sum(debit_fen) FILTER (WHERE event_type = 'CAPTURED'), 0)::bigint AS redeemed_fen,
        coalesce(sum(order_fen) FILTER (WHERE event_type = 'CAPTURED'), 0)::bigint AS order_fen,
        count(*) FILTER (WHERE event_type = 'REFUNDED') AS refunds,
        coalesce(sum(credit_fen) FILTER (WHERE event_type = 'REFUNDED'), 0)::bigint AS refunded_fen,
        count(DISTINCT merchant_id) FILTER (WHERE event_type = 'CAPTURED') AS merchants,
        count(*) FILTER (WHERE event_type = 'CLAWED_BACK') AS clawbacks,
        coalesce(sum(credit_fen) FILTER (WHERE event_type = 'CLAWED_BACK'), 0)::bigint AS clawed_back_fen
    FROM detailed
    GROUP BY GROUPING SETS (
        (kind, campaign_id, category, merchant_id, original_date), (kind, campaign_id, category), (kind)
    )
)
SELECT grouped.*, coalesce(campaign.name, '') AS campaign_name, coalesce(merchant.name, '') AS merchant_name
FROM grouped
LEFT JOIN campaigns AS campaign ON campaign.campaign_id = grouped.campaign_id
LEFT JOIN merchants AS merchant ON merchant.merchant_id = grouped.merchant_id
ORDER BY grouped.kind = '{ADJUSTMENT}', grouped.campaign_id IS NULL, grouped.campaign_id COLLATE "C",
    grouped.category IS NULL, grouped.category COLLATE "C", grouped.merchant_id IS NULL,
    grouped.original_date NULLS FIRST, grouped.merchant_id COLLATE "C"
"""

BUDGET_COLUMNS = (
    "business_date",
    "position",
    "campaign_id",
    "campaign_name",
    "category",
    "budget_fen",
    "released_fen",
    "opening_spent_fen",
    "captured_fen",
    "refunded_fen",
    "closing_spent_fen",
    "opening_held_fen",
    "held_fen",
    "released_hold_fen",
    "closing_held_fen",
    "remaining_fen",
    "chain_spent_fen",
    "chain_held_fen",
    "clawed_back_fen",
    "opening_recovered_fen",
    "closing_recovered_fen",
    "chain_recovered_fen",
)
ROW_COLUMNS = (
    "business_date",
    "position",
    "kind",
    "level",
    "original_date",
    "campaign_id",
    "campaign_name",
    "category",
    "merchant_id",
    "merchant_name",
    "consumers",
    "sales",
    "units",
    "redeemed_fen",
    "order_fen",
    "refunds",
    "refunded_fen",
    "merchants",
    "clawbacks",
    "clawed_back_fen",
)


@dataclass(frozen=True)
class PublishResult:
    published: list[ReportHeader]  # the reports this call cut, oldest first
    last_published: date | None
    last_closed: date


async def publish_closed_days(
    connection: asyncpg.Connection,
    calendar: BusinessCalendar,
    now: datetime,
    published_by: str,
    up_to: date | None = None,
) -> PublishResult:
    """Publishes, in order, every closed day after the last published report up to ``up_to``
    (default: the last closed day); the first report ever is the first day with ledger entries.
    Raises DayNotClosed when ``up_to`` has not closed at ``now``."""
    last_closed = calendar.last_closed_day(now)
    target = up_to or last_closed
    if target > last_closed:
        raise DayNotClosed(target, calendar.closes_at(target))
    published: list[ReportHeader] = []
    await connection.execute("SELECT pg_advisory_lock($1)", PUBLISH_LOCK_ID)
    try:
        previous = await latest_header(connection)
        if previous is not None:
            day = previous.business_date + timedelta(days=1)
        else:
            first = await connection.fetchval("SELECT min(occurred_at) FROM ledger_entries")
            if first is None:
                return PublishResult([], None, last_closed)
            day = calendar.day_of(first)
        while day <= target:
            previous = await _cut(connection, calendar, day, published_by, previous)
            published.append(previous)
            day += timedelta(days=1)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", PUBLISH_LOCK_ID)
    return PublishResult(published, previous.business_date if previous else None, last_closed)


async def _cut(
    connection: asyncpg.Connection,
    calendar: BusinessCalendar,
    day: date,
    published_by: str,
    previous: ReportHeader | None,
) -> ReportHeader:
    start, end = calendar.bounds(day)
    async with connection.transaction(isolation="repeatable_read"):
        await connection.execute(f"SET LOCAL work_mem = '{CUT_WORK_MEM}'")
        heads_rows = await connection.fetch(
            "SELECT campaign_id, last_seq, last_hash, clock_timestamp() AS now FROM ledger_chain_heads"
            ' ORDER BY campaign_id COLLATE "C"'
        )
        cut_at = heads_rows[0]["now"] if heads_rows else await connection.fetchval("SELECT clock_timestamp()")
        heads = tuple(ChainHead(row["campaign_id"], int(row["last_seq"]), row["last_hash"]) for row in heads_rows)
        low = previous.watermark() if previous else {}
        campaigns = [head.campaign_id for head in heads]
        marks = (campaigns, [low.get(campaign, 0) for campaign in campaigns], [head.seq for head in heads])
        opened, resolved, overdue = await ticket_counts(connection, start, end)
        header = ReportHeader(
            business_date=day,
            timezone=calendar.timezone,
            cutoff=calendar.cutoff,
            day_starts_at=start,
            day_ends_at=end,
            cut_at=cut_at,
            published_by=published_by,
            previous_date=previous.business_date if previous else None,
            previous_hash=previous.content_hash if previous else GENESIS_HASH,
            chain_heads=heads,
            tickets_opened=opened,
            tickets_resolved=resolved,
            tickets_overdue=overdue,
        )
        hasher = ContentHasher(header)
        budgets = await _budgets(connection, start, end, marks, previous, int(end.timestamp() * 1000))
        for line in budgets:
            hasher.budget(line)
        await connection.copy_records_to_table(
            "daily_report_budgets",
            records=[_budget_record(day, position, line) for position, line in enumerate(budgets, 1)],
            columns=BUDGET_COLUMNS,
        )
        checker = RowChecker()
        batch: list[tuple[Any, ...]] = []
        position = adjustments = 0
        day_total_seen = False

        async def put(row: ReportRow) -> None:
            nonlocal position, adjustments
            position += 1
            adjustments += row.kind == ADJUSTMENT
            checker.add(row)
            hasher.row(row)
            batch.append(_row_record(day, position, row))
            if len(batch) >= ROW_BATCH:
                await connection.copy_records_to_table("daily_report_rows", records=batch, columns=ROW_COLUMNS)
                batch.clear()

        async for record in connection.cursor(ROWS, start, end, *marks, calendar.timezone, prefetch=ROW_BATCH):
            row = _row(record)
            if row.kind == ADJUSTMENT and not day_total_seen:
                await put(district_total(DAY))  # a day without sales still has its (zero) total
                day_total_seen = True
            day_total_seen = day_total_seen or (row.kind == DAY and row.level == DISTRICT_TOTAL)
            await put(row)
        if not day_total_seen:
            await put(district_total(DAY))
        checker.finish(budgets)
        if batch:
            await connection.copy_records_to_table("daily_report_rows", records=batch, columns=ROW_COLUMNS)
        final = replace(
            header,
            budget_count=len(budgets),
            row_count=position,
            adjustment_rows=adjustments,
            content_hash=hasher.hexdigest(),
        )
        await connection.execute(
            "INSERT INTO daily_reports (business_date, timezone, cutoff, day_starts_at, day_ends_at, cut_at,"
            " published_by, previous_date, previous_hash, chain_heads, budget_count, row_count, adjustment_rows,"
            " format_version, content_hash, tickets_opened, tickets_resolved, tickets_overdue)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13, $14, $15, $16, $17, $18)",
            final.business_date,
            final.timezone,
            final.cutoff,
            final.day_starts_at,
            final.day_ends_at,
            final.cut_at,
            final.published_by,
            final.previous_date,
            final.previous_hash,
            orjson.dumps({head.campaign_id: {"seq": head.seq, "hash": head.hash} for head in heads}).decode(),
            final.budget_count,
            final.row_count,
            final.adjustment_rows,
            final.format_version,
            final.content_hash,
            final.tickets_opened,
            final.tickets_resolved,
            final.tickets_overdue,
        )
    return final


# The complaints desk's day [start, end): tickets opened in it, closed RESOLVED or REJECTED in
# it, and open at its end past a deadline then: the first reply due before the end and not
# given by its deadline (given late, or not yet), or the resolution due before the end. The
# deadlines are each ticket's own, fixed by the SLA when it was opened (storage/postgres/
# complaints.py). Read inside the cut's snapshot: a published report keeps what it counted.
TICKET_COUNTS = """
SELECT
    count(*) FILTER (WHERE opened_at >= $1 AND opened_at < $2) AS opened,
    count(*) FILTER (WHERE closed_at >= $1 AND closed_at < $2 AND state IN ('RESOLVED', 'REJECTED')) AS resolved,
    count(*) FILTER (WHERE opened_at < $2 AND (closed_at IS NULL OR closed_at >= $2) AND (
        (first_reply_due_at < $2 AND (first_replied_at IS NULL OR first_replied_at > first_reply_due_at))
        OR resolution_due_at < $2)) AS overdue
FROM tickets WHERE opened_at < $2 AND (closed_at IS NULL OR closed_at >= $1)
"""


async def ticket_counts(connection: asyncpg.Connection, start: datetime, end: datetime) -> tuple[int, int, int]:
    """(opened, resolved or rejected, overdue at the end) of the business day [start, end)."""
    row = await connection.fetchrow(TICKET_COUNTS, start, end)
    return int(row["opened"]), int(row["resolved"]), int(row["overdue"])


async def _budgets(
    connection: asyncpg.Connection,
    start: datetime,
    end: datetime,
    marks: tuple[list[str], list[int], list[int]],
    previous: ReportHeader | None,
    day_end_ms: int,
) -> list[BudgetLine]:
    rules: dict[tuple[str, str], Rule] = {}
    for row in await connection.fetch(
        "SELECT rule.campaign_id, campaign.name, rule.category, rule.budget_fen, rule.tranches"
        " FROM campaign_rules AS rule JOIN campaigns AS campaign USING (campaign_id)"
    ):
        tranches = orjson.loads(row["tranches"]) if isinstance(row["tranches"], str) else row["tranches"] or []
        schedule = tuple(
            (int(datetime.fromisoformat(item["release_at"]).timestamp() * 1000), int(item["amount_fen"]))
            for item in tranches
        )
        rules[(row["campaign_id"], row["category"])] = Rule(
            row["campaign_id"], row["name"], row["category"], int(row["budget_fen"]), schedule
        )
    flows: dict[tuple[str, str], Flows] = {}
    for row in await connection.fetch(BUDGET_FLOWS, start, end, *marks):
        flows.setdefault((row["campaign_id"], row["category"]), Flows()).add(
            row["part"], row["account"], row["event_type"], int(row["debit"]), int(row["credit"])
        )
    earlier: dict[tuple[str, str], BudgetLine] = {}
    if previous is not None:
        async for line in stream_budgets(connection, previous.business_date):
            earlier[(line.campaign_id, line.category)] = line
    lines = []
    for key in sorted(set(rules) | set(flows) | set(earlier)):
        rule = rules.get(key) or Rule(key[0], "", key[1], 0)
        lines.append(budget_line(rule, flows.get(key, Flows()), earlier.get(key), day_end_ms))
    return lines


def _row(record: asyncpg.Record) -> ReportRow:
    level = LEVEL_BY_GROUPING[int(record["rollup"])]
    return ReportRow(
        kind=record["kind"],
        level=level,
        original_date=record["original_date"] if level == MERCHANT else None,
        campaign_id=record["campaign_id"] or "",
        campaign_name=record["campaign_name"] if level != DISTRICT_TOTAL else "",
        category=record["category"] or "",
        merchant_id=record["merchant_id"] or "",
        merchant_name=record["merchant_name"] if level == MERCHANT else "",
        figures=Figures(
            consumers=int(record["consumers"]),
            sales=int(record["sales"]),
            units=int(record["units"]),
            redeemed_fen=int(record["redeemed_fen"]),
            order_fen=int(record["order_fen"]),
            refunds=int(record["refunds"]),
            refunded_fen=int(record["refunded_fen"]),
            merchants=int(record["merchants"]),
            clawbacks=int(record["clawbacks"]),
            clawed_back_fen=int(record["clawed_back_fen"]),
        ),
    )


def _budget_record(day: date, position: int, line: BudgetLine) -> tuple[Any, ...]:
    return (day, position, *(getattr(line, name) for name in BUDGET_COLUMNS[2:]))


def _row_record(day: date, position: int, row: ReportRow) -> tuple[Any, ...]:
    figures = row.figures
    return (
        day,
        position,
        row.kind,
        row.level,
        row.original_date,
        row.campaign_id,
        row.campaign_name,
        row.category,
        row.merchant_id,
        row.merchant_name,
        figures.consumers,
        figures.sales,
        figures.units,
        figures.redeemed_fen,
        figures.order_fen,
        figures.refunds,
        figures.refunded_fen,
        figures.merchants,
        figures.clawbacks,
        figures.clawed_back_fen,
    )


def _header(record: asyncpg.Record) -> ReportHeader:
    heads = orjson.loads(record["chain_heads"])
    return ReportHeader(
        business_date=record["business_date"],
        timezone=record["timezone"],
        cutoff=record["cutoff"],
        day_starts_at=record["day_starts_at"],
        day_ends_at=record["day_ends_at"],
        cut_at=record["cut_at"],
        published_by=record["published_by"],
        previous_date=record["previous_date"],
        previous_hash=record["previous_hash"],
        chain_heads=tuple(
            ChainHead(campaign_id, int(head["seq"]), head["hash"])
            for campaign_id, head in sorted(heads.items(), key=lambda item: item[0].encode())
        ),
        budget_count=record["budget_count"],
        row_count=record["row_count"],
        adjustment_rows=record["adjustment_rows"],
        format_version=record["format_version"],
        content_hash=record["content_hash"],
        tickets_opened=int(record["tickets_opened"]),
        tickets_resolved=int(record["tickets_resolved"]),
        tickets_overdue=int(record["tickets_overdue"]),
    )


async def latest_header(connection: asyncpg.Connection) -> ReportHeader | None:
    record = await connection.fetchrow("SELECT * FROM daily_reports ORDER BY business_date DESC LIMIT 1")
    return _header(record) if record else None


async def header(connection: asyncpg.Connection, day: date) -> ReportHeader | None:
    record = await connection.fetchrow("SELECT * FROM daily_reports WHERE business_date = $1", day)
    return _header(record) if record else None


async def list_headers(
    connection: asyncpg.Connection, since: date | None, until: date | None, limit: int
) -> list[ReportHeader]:
    """Published reports in [since, until], newest first, at most ``limit``."""
    records = await connection.fetch(
        "SELECT * FROM daily_reports WHERE business_date >= coalesce($1, '-infinity'::date)"
        " AND business_date <= coalesce($2, 'infinity'::date) ORDER BY business_date DESC LIMIT $3",
        since,
        until,
        limit,
    )
    return [_header(record) for record in records]


@asynccontextmanager
async def reading(connection: asyncpg.Connection) -> AsyncIterator[None]:
    """The read-only transaction a report's cursors run in."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        yield


async def stream_budgets(connection: asyncpg.Connection, day: date) -> AsyncIterator[BudgetLine]:
    """The budget lines in stored order (few: one per campaign x category)."""
    for record in await connection.fetch(
        "SELECT * FROM daily_report_budgets WHERE business_date = $1 ORDER BY position", day
    ):
        yield BudgetLine(**{name: record[name] for name in BUDGET_COLUMNS[2:]})


async def stream_rows(
    connection: asyncpg.Connection, day: date, levels: Sequence[str] = (), batch: int = ROW_BATCH
) -> AsyncIterator[ReportRow]:
    """The rows in stored order through a cursor (call inside ``reading``); ``levels`` keeps
    only those levels."""
    query = "SELECT * FROM daily_report_rows WHERE business_date = $1"
    arguments: list[Any] = [day]
    if levels:
        query += " AND level = ANY($2::text[])"
        arguments.append(list(levels))
    async for record in connection.cursor(query + " ORDER BY position", *arguments, prefetch=batch):
        yield ReportRow(
            kind=record["kind"],
            level=record["level"],
            original_date=record["original_date"],
            campaign_id=record["campaign_id"],
            campaign_name=record["campaign_name"],
            category=record["category"],
            merchant_id=record["merchant_id"],
            merchant_name=record["merchant_name"],
            figures=Figures(**{name: int(record[name]) for name in ROW_COLUMNS[10:]}),
        )


async def verify(connection: asyncpg.Connection, day: date) -> bool | None:
    """Whether the stored report of ``day`` still has its content hash (None: not published)."""
    async with reading(connection):
        found = await header(connection, day)
        if found is None:
            return None
        hasher = ContentHasher(found)
        async for line in stream_budgets(connection, day):
            hasher.budget(line)
        async for row in stream_rows(connection, day):
            hasher.row(row)
    return hasher.hexdigest() == found.content_hash


async def campaign_is_empty(connection: asyncpg.Connection, campaign_id: str) -> bool:
    """Whether the ledger holds no entry of the campaign (make run's report demo)."""
    head: int | None = await connection.fetchval(
        "SELECT last_seq FROM ledger_chain_heads WHERE campaign_id = $1", campaign_id
    )
    return not head


async def last_published_day(connection: asyncpg.Connection) -> date | None:
    value: date | None = await connection.fetchval("SELECT max(business_date) FROM daily_reports")
    return value


async def district_totals(connection: asyncpg.Connection, days: Sequence[date]) -> dict[date, dict[str, Figures]]:
    """The district totals (day and adjustments) of published reports, by day and kind."""
    totals: dict[date, dict[str, Figures]] = {}
    for record in await connection.fetch(
        "SELECT * FROM daily_report_rows WHERE business_date = ANY($1::date[]) AND level = $2",
        list(days),
        DISTRICT_TOTAL,
    ):
        totals.setdefault(record["business_date"], {})[record["kind"]] = Figures(
            **{name: int(record[name]) for name in ROW_COLUMNS[10:]}
        )
    return totals


async def write_simulated(
    connection: asyncpg.Connection, events: Iterable[tuple[str, dict[str, Any]]], batch: int = 5_000
) -> int:
    """Writes simulated ledger events (server/domain/ledger_sim.py: stream entry id, payload)
    exactly as the ledger writer writes what it reads from the stream: parsed, then
    ``write_batch`` (double entry, hash chain). For tests, the report benchmark and make run's
    demo day. Returns how many it wrote."""
    written = 0
    pending: list[LedgerEvent] = []
    for entry_id, payload in events:
        pending.append(parse_event(entry_id, {b"e": orjson.dumps(payload)}))
        if len(pending) >= batch:
            await write_batch(connection, pending)
            written += len(pending)
            pending = []
    if pending:
        await write_batch(connection, pending)
        written += len(pending)
    return written


async def day_so_far(connection: asyncpg.Connection, calendar: BusinessCalendar, day: date) -> list[ReportRow]:
    """The day's report rows as far as the ledger holds them now (live supervision's figures of
    today): the same ROWS cut as a published report, over every entry of the day written so far
    (high watermark the chain heads; low the same, so there are no adjustment rows). Not
    published, not hashed; a day's rows are one per campaign x category x merchant, so few."""
    start, end = calendar.bounds(day)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        heads = await connection.fetch(
            'SELECT campaign_id, last_seq FROM ledger_chain_heads ORDER BY campaign_id COLLATE "C"'
        )
        campaigns = [row["campaign_id"] for row in heads]
        seqs = [int(row["last_seq"]) for row in heads]
        records = await connection.fetch(ROWS, start, end, campaigns, seqs, seqs, calendar.timezone)
    return [_row(record) for record in records]
