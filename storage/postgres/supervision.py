"""What live supervision reads from PostgreSQL: the budgets to watch (campaigns and their
rules: name, budget, tranches, qualification quota), captures per minute from the ledger, and
the merchants' sales for the surge detector."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import orjson

from server.domain.supervision import SurgeRule

# Any constant naming the surge detector's lock (one detector at a time across processes).
SURGE_LOCK_ID = 741_852_965


@dataclass(frozen=True)
class BudgetPlan:
    """One campaign x category budget as reference data defines it."""

    campaign_id: str
    campaign_name: str
    category: str
    budget_fen: int
    tranches: tuple[tuple[int, int], ...]  # (release ms, amount fen)
    qualification_quota: int


def _tranches(raw: object) -> tuple[tuple[int, int], ...]:
    items = orjson.loads(raw) if isinstance(raw, str | bytes) else list(raw or [])  # type: ignore[call-overload]
    return tuple(
        (int(datetime.fromisoformat(item["release_at"]).timestamp() * 1000), int(item["amount_fen"])) for item in items
    )


async def budget_plans(connection: asyncpg.Connection) -> list[BudgetPlan]:
    """Every campaign x category budget, in campaign and category order."""
    rows = await connection.fetch(
        "SELECT c.campaign_id, c.name, r.category, r.budget_fen, r.tranches, r.qualification_quota"
        " FROM campaigns AS c JOIN campaign_rules AS r USING (campaign_id)"
        ' ORDER BY c.campaign_id COLLATE "C", r.category COLLATE "C"'
    )
    return [
        BudgetPlan(
            row["campaign_id"],
            row["name"],
            row["category"],
            row["budget_fen"],
            _tranches(row["tranches"]),
            row["qualification_quota"],
        )
        for row in rows
    ]


async def captures_since(connection: asyncpg.Connection, since: datetime) -> dict[tuple[str, str], int]:
    """Captures per campaign x category since ``since`` (CAPTURED events crediting merchants,
    one entry per event and category; index ledger_entries_occurred)."""
    rows = await connection.fetch(
        "SELECT campaign_id, category, count(*) AS captures FROM ledger_entries"
        " WHERE occurred_at >= $1 AND event_type = 'CAPTURED' AND account = 'MERCHANT_RECEIVABLE'"
        " GROUP BY campaign_id, category",
        since,
    )
    return {(row["campaign_id"], row["category"]): int(row["captures"]) for row in rows}


@dataclass(frozen=True)
class MerchantSales:
    merchant_id: str
    last_hour_sales: int
    baseline_sales: int


async def merchant_sales(connection: asyncpg.Connection, now: datetime, rule: SurgeRule) -> list[MerchantSales]:
    """Each merchant with at least ``rule.min_sales`` captures in the hour before ``now`` (the
    only ones that can surge), with its captures over the ``rule.baseline_hours`` before that
    hour (index ledger_events_merchant_captures). A sale is one CAPTURED event."""
    hour_ago = now - timedelta(hours=1)
    rows = await connection.fetch(
        """
        WITH recent AS (
            SELECT merchant_id, count(*) AS sales FROM ledger_events
            WHERE event_type = 'CAPTURED' AND occurred_at >= $1 AND occurred_at < $2
            GROUP BY merchant_id HAVING count(*) >= $3
        )
        SELECT recent.merchant_id, recent.sales, (
            SELECT count(*) FROM ledger_events AS e
            WHERE e.event_type = 'CAPTURED' AND e.merchant_id = recent.merchant_id
                AND e.occurred_at >= $4 AND e.occurred_at < $1
        ) AS baseline
        FROM recent ORDER BY recent.merchant_id COLLATE "C"
        """,
        hour_ago,
        now,
        rule.min_sales,
        hour_ago - timedelta(hours=rule.baseline_hours),
    )
    return [MerchantSales(row["merchant_id"], int(row["sales"]), int(row["baseline"])) for row in rows]


async def try_surge_lock(connection: asyncpg.Connection) -> bool:
    """Takes the surge detector's transaction-scoped lock if free (inside a transaction)."""
    return bool(await connection.fetchval("SELECT pg_try_advisory_xact_lock($1)", SURGE_LOCK_ID))
