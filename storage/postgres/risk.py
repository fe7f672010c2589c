"""Offline risk detection over the PostgreSQL ledger (issue 14, section 2): the SQL that gathers
each detector's figures from ``ledger_events`` (never the Redis counters: the ledger is the
single truth, and it holds every sale even after Redis forgot it), and the rules of
server/domain/risk_detection.py applied to them.

Each query covers one window [start, end) of ``occurred_at``. Aggregates (shares, late
refunds) are computed in PostgreSQL and come back one row per merchant and category; the
sliding-window detectors (bursts, travel) are pre-filtered in SQL (terminals with enough sales
in some window; consecutive sales at two stores close in time) and streamed through a cursor
in order, so Python holds one terminal's window or one consumer's hops at a time.
Cursors need a transaction: ``detect`` opens one (REPEATABLE READ, read only), so every
detector sees the same snapshot of the ledger.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import orjson

from server.domain.risk_detection import (
    BURST_MIN_CONSUMERS,
    BURST_WINDOW_S,
    CAPPED_SHARE,
    DETECTORS,
    EVIDENCE_ITEMS_MAX,
    IMPOSSIBLE_TRAVEL,
    LATE_REFUND,
    LATE_REFUND_WINDOW_S,
    TERMINAL_BURST,
    THRESHOLD_BAND_BP,
    THRESHOLD_CLUSTER,
    TRAVEL_MAX_GAP_S,
    Finding,
    Hop,
    LateRefunds,
    Sale,
    ShareStats,
    impossible_travel,
    late_refund_finding,
    share_anomaly,
    terminal_bursts,
)

CURSOR_BATCH = 2_000
# The window functions' sorts stay in memory rather than spilling: for this transaction only.
DETECT_WORK_MEM = "256MB"

CAPTURED_LINES = """
captured AS (
    SELECT e.campaign_id, e.merchant_id, line->>'c' AS category, (line->>'p')::bigint AS price_fen,
        (line->>'s')::bigint AS subsidy_fen
    FROM ledger_events AS e CROSS JOIN LATERAL jsonb_array_elements(e.lines) AS line
    WHERE e.event_type = 'CAPTURED' AND e.occurred_at >= $1 AND e.occurred_at < $2
)"""

SHARE_TAIL = """
SELECT campaign_id, category, merchant_id, hits, lines,
    sum(hits) OVER category_window AS category_hits, sum(lines) OVER category_window AS category_lines
FROM per_merchant
WINDOW category_window AS (PARTITION BY campaign_id, category)
ORDER BY campaign_id, category, merchant_id
"""

# A line is capped when its subsidy is exactly its rule's cap (rules without a cap never are).
CAPPED_SHARE_SQL = f"""
WITH {CAPTURED_LINES},
per_merchant AS (
    SELECT c.campaign_id, c.category, c.merchant_id,
        count(*) FILTER (WHERE c.subsidy_fen = r.cap_fen) AS hits, count(*) AS lines
    FROM captured AS c JOIN campaign_rules AS r ON r.campaign_id = c.campaign_id AND r.category = c.category
    WHERE r.cap_fen > 0
    GROUP BY c.campaign_id, c.category, c.merchant_id
)
{SHARE_TAIL}
"""

# Lines of FIXED rules with a threshold, priced in [threshold, threshold + band].
THRESHOLD_CLUSTER_SQL = f"""
WITH {CAPTURED_LINES},
per_merchant AS (
    SELECT c.campaign_id, c.category, c.merchant_id,
        count(*) FILTER (
            WHERE c.price_fen BETWEEN r.threshold_fen AND r.threshold_fen + r.threshold_fen * $3 / 10000
        ) AS hits,
        count(*) AS lines
    FROM captured AS c JOIN campaign_rules AS r ON r.campaign_id = c.campaign_id AND r.category = c.category
    WHERE r.kind = 'FIXED' AND r.threshold_fen > 0
    GROUP BY c.campaign_id, c.category, c.merchant_id
)
{SHARE_TAIL}
"""

# Captures of the terminals that had at least $4 sales within $3 seconds somewhere in the
# window (a necessary condition for $4 distinct consumers), in terminal then time order.
TERMINAL_SALES_SQL = """
WITH sales AS (
    SELECT terminal_id, occurred_at, consumer_key, authorization_id,
        count(*) OVER (
            PARTITION BY terminal_id ORDER BY occurred_at
            RANGE BETWEEN make_interval(secs => $3) PRECEDING AND CURRENT ROW
        ) AS recent
    FROM ledger_events
    WHERE event_type = 'CAPTURED' AND occurred_at >= $1 AND occurred_at < $2
),
busy AS (SELECT DISTINCT terminal_id FROM sales WHERE recent >= $4)
SELECT sales.terminal_id, sales.occurred_at, sales.consumer_key, sales.authorization_id
FROM sales JOIN busy USING (terminal_id)
ORDER BY sales.terminal_id, sales.occurred_at, sales.authorization_id
"""

# Consecutive captures of one consumer at two different physical stores, at most $3 seconds
# apart (a longer gap is never an impossible journey inside the district).
HOPS_SQL = """
WITH sales AS (
    SELECT e.consumer_key, e.occurred_at, e.merchant_id, e.authorization_id, s.store_id, s.latitude, s.longitude
    FROM ledger_events AS e
    JOIN terminals AS t ON t.terminal_id = e.terminal_id
    JOIN stores AS s ON s.store_id = t.store_id
    WHERE e.event_type = 'CAPTURED' AND e.occurred_at >= $1 AND e.occurred_at < $2 AND s.kind = 'PHYSICAL'
),
paired AS (
    SELECT sales.*,
        lag(store_id) OVER consumer_window AS from_store,
        lag(merchant_id) OVER consumer_window AS from_merchant,
        lag(occurred_at) OVER consumer_window AS from_at,
        lag(latitude) OVER consumer_window AS from_latitude,
        lag(longitude) OVER consumer_window AS from_longitude
    FROM sales
    WINDOW consumer_window AS (PARTITION BY consumer_key ORDER BY occurred_at, authorization_id)
)
SELECT * FROM paired
WHERE from_store IS NOT NULL AND from_store <> store_id AND occurred_at - from_at <= make_interval(secs => $3)
ORDER BY consumer_key, occurred_at, authorization_id
"""

# Refunds in the window of sales made with a voucher (the event names its redemption code),
# per merchant: how many landed within $3 seconds after the voucher's expiry, and examples.
LATE_REFUNDS_SQL = """
WITH refunds AS (
    SELECT e.merchant_id, e.authorization_id, e.occurred_at, q.expires_at,
        e.occurred_at > q.expires_at AND e.occurred_at <= q.expires_at + make_interval(secs => $3) AS late
    FROM ledger_events AS e JOIN qualifications AS q ON q.redemption_code = e.payload->>'qualification'
    WHERE e.event_type = 'REFUNDED' AND e.occurred_at >= $1 AND e.occurred_at < $2
        AND e.payload->>'qualification' <> ''
)
SELECT merchant_id, count(*) FILTER (WHERE late) AS late_refunds, count(*) AS voucher_refunds,
    (array_agg(
        jsonb_build_object('authorization_id', authorization_id, 'refunded_at', occurred_at, 'expired_at', expires_at)
        ORDER BY occurred_at
    ) FILTER (WHERE late))[1:$4] AS examples
FROM refunds
GROUP BY merchant_id
HAVING count(*) FILTER (WHERE late) > 0
ORDER BY merchant_id
"""


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError("a detection window must end after it starts")


async def _shares(connection: asyncpg.Connection, detector: str, sql: str, *extra: object) -> list[Finding]:
    findings: list[Finding] = []
    async for record in connection.cursor(sql, *extra, prefetch=CURSOR_BATCH):
        stats = ShareStats(
            record["campaign_id"],
            record["category"],
            record["merchant_id"],
            int(record["hits"]),
            int(record["lines"]),
            int(record["category_hits"]),
            int(record["category_lines"]),
        )
        finding = share_anomaly(detector, stats)
        if finding is not None:
            findings.append(finding)
    return findings


async def capped_share(connection: asyncpg.Connection, window: Window) -> list[Finding]:
    return await _shares(connection, CAPPED_SHARE, CAPPED_SHARE_SQL, window.start, window.end)


async def threshold_cluster(connection: asyncpg.Connection, window: Window) -> list[Finding]:
    return await _shares(
        connection, THRESHOLD_CLUSTER, THRESHOLD_CLUSTER_SQL, window.start, window.end, THRESHOLD_BAND_BP
    )


async def _terminal_sales(connection: asyncpg.Connection, window: Window) -> AsyncIterator[Sale]:
    async for record in connection.cursor(
        TERMINAL_SALES_SQL, window.start, window.end, float(BURST_WINDOW_S), BURST_MIN_CONSUMERS, prefetch=CURSOR_BATCH
    ):
        yield Sale(record["terminal_id"], record["occurred_at"], record["consumer_key"], record["authorization_id"])


async def terminal_burst(connection: asyncpg.Connection, window: Window) -> list[Finding]:
    # The pure rule consumes a plain iterator; one terminal's sales are collected at a time
    # (bounded by the terminal's busiest day, not the ledger).
    findings: list[Finding] = []
    batch: list[Sale] = []
    async for sale in _terminal_sales(connection, window):
        if batch and sale.subject_id != batch[-1].subject_id:
            findings.extend(terminal_bursts(batch))
            batch = []
        batch.append(sale)
    findings.extend(terminal_bursts(batch))
    return findings


async def travel(connection: asyncpg.Connection, window: Window) -> list[Finding]:
    findings: list[Finding] = []
    batch: list[Hop] = []
    async for record in connection.cursor(
        HOPS_SQL, window.start, window.end, float(TRAVEL_MAX_GAP_S), prefetch=CURSOR_BATCH
    ):
        hop = Hop(
            record["consumer_key"],
            record["from_store"],
            record["store_id"],
            record["from_merchant"],
            record["merchant_id"],
            record["from_at"],
            record["occurred_at"],
            record["from_latitude"],
            record["from_longitude"],
            record["latitude"],
            record["longitude"],
            record["authorization_id"],
        )
        if batch and hop.consumer_key != batch[-1].consumer_key:
            findings.extend(impossible_travel(batch))
            batch = []
        batch.append(hop)
    findings.extend(impossible_travel(batch))
    return findings


async def late_refund(connection: asyncpg.Connection, window: Window) -> list[Finding]:
    findings: list[Finding] = []
    async for record in connection.cursor(
        LATE_REFUNDS_SQL,
        window.start,
        window.end,
        float(LATE_REFUND_WINDOW_S),
        EVIDENCE_ITEMS_MAX,
        prefetch=CURSOR_BATCH,
    ):
        examples = [orjson.loads(item) if isinstance(item, str) else item for item in record["examples"] or []]
        stats = LateRefunds(
            record["merchant_id"], int(record["late_refunds"]), int(record["voucher_refunds"]), examples
        )
        finding = late_refund_finding(stats)
        if finding is not None:
            findings.append(finding)
    return findings


RUNNERS: dict[str, Callable[[asyncpg.Connection, Window], Awaitable[list[Finding]]]] = {
    CAPPED_SHARE: capped_share,
    THRESHOLD_CLUSTER: threshold_cluster,
    TERMINAL_BURST: terminal_burst,
    IMPOSSIBLE_TRAVEL: travel,
    LATE_REFUND: late_refund,
}


async def detect(
    connection: asyncpg.Connection,
    window: Window,
    detectors: Sequence[str] = DETECTORS,
    progress: Callable[[str, int, float], None] | None = None,
) -> dict[str, list[Finding]]:
    """Runs ``detectors`` over one snapshot of the ledger; findings per detector.
    ``progress(detector, findings, seconds)`` is called after each."""
    unknown = [name for name in detectors if name not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown detectors: {', '.join(unknown)}")
    results: dict[str, list[Finding]] = {}
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        await connection.execute(f"SET LOCAL work_mem = '{DETECT_WORK_MEM}'")
        for name in detectors:
            began = time.monotonic()
            results[name] = await RUNNERS[name](connection, window)
            if progress is not None:
                progress(name, len(results[name]), time.monotonic() - began)
    return results


def day_window(start: datetime) -> Window:
    return Window(start, start + timedelta(days=1))
