"""Supervision alerts in PostgreSQL (migration 0012): recorded once by their key, whichever
process raises them first, and read back newest first or by business day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

BUDGET_THRESHOLD, MERCHANT_SURGE = "BUDGET_THRESHOLD", "MERCHANT_SURGE"
COLUMNS = (
    "alert_id, alert_key, kind, campaign_id, category, merchant_id, threshold_percent, observed, baseline,"
    " message, raised_at, business_date"
)


@dataclass(frozen=True)
class AlertRecord:
    alert_id: int
    alert_key: str
    kind: str
    campaign_id: str
    category: str
    merchant_id: str
    threshold_percent: int
    observed: float
    baseline: float
    message: str
    raised_at: datetime
    business_date: date


@dataclass(frozen=True)
class NewAlert:
    alert_key: str
    kind: str
    message: str
    observed: float
    baseline: float
    raised_at: datetime
    business_date: date
    campaign_id: str = ""
    category: str = ""
    merchant_id: str = ""
    threshold_percent: int = 0


def budget_threshold_key(campaign_id: str, category: str, threshold_percent: int) -> str:
    return f"{BUDGET_THRESHOLD}:{campaign_id}:{category}:{threshold_percent}"


def merchant_surge_key(merchant_id: str, business_date: date) -> str:
    return f"{MERCHANT_SURGE}:{merchant_id}:{business_date.isoformat()}"


def _record(row: asyncpg.Record) -> AlertRecord:
    return AlertRecord(**dict(row))


async def record_alert(connection: asyncpg.Connection, alert: NewAlert, raised_by: str) -> AlertRecord | None:
    """Inserts the alert unless one with its key exists; the new record, or None when another
    call (this process earlier, or another process) recorded it first."""
    row = await connection.fetchrow(
        "INSERT INTO supervision_alerts (alert_key, kind, campaign_id, category, merchant_id, threshold_percent,"
        " observed, baseline, message, raised_at, business_date, raised_by)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        f" ON CONFLICT (alert_key) DO NOTHING RETURNING {COLUMNS}",
        alert.alert_key,
        alert.kind,
        alert.campaign_id,
        alert.category,
        alert.merchant_id,
        alert.threshold_percent,
        alert.observed,
        alert.baseline,
        alert.message,
        alert.raised_at,
        alert.business_date,
        raised_by,
    )
    return None if row is None else _record(row)


async def recorded_keys(connection: asyncpg.Connection, keys: list[str]) -> set[str]:
    """Which of these alert keys are recorded already (so a process skips them from then on)."""
    rows = await connection.fetch("SELECT alert_key FROM supervision_alerts WHERE alert_key = ANY($1::text[])", keys)
    return {row["alert_key"] for row in rows}


async def alerts_since(connection: asyncpg.Connection, since: datetime, limit: int) -> list[AlertRecord]:
    """Alerts raised at or after ``since``, newest first."""
    rows = await connection.fetch(
        f"SELECT {COLUMNS} FROM supervision_alerts WHERE raised_at >= $1 ORDER BY raised_at DESC, alert_id DESC"
        " LIMIT $2",
        since,
        limit,
    )
    return [_record(row) for row in rows]


async def alerts_after(connection: asyncpg.Connection, alert_id: int, limit: int) -> list[AlertRecord]:
    """Alerts recorded after ``alert_id`` (by any process), oldest first."""
    rows = await connection.fetch(
        f"SELECT {COLUMNS} FROM supervision_alerts WHERE alert_id > $1 ORDER BY alert_id LIMIT $2", alert_id, limit
    )
    return [_record(row) for row in rows]


async def alerts_of_day(connection: asyncpg.Connection, business_date: date) -> list[AlertRecord]:
    """The alerts of one business day, in the order they were recorded (for the daily report)."""
    rows = await connection.fetch(
        f"SELECT {COLUMNS} FROM supervision_alerts WHERE business_date = $1 ORDER BY alert_id", business_date
    )
    return [_record(row) for row in rows]


async def last_alert_id(connection: asyncpg.Connection) -> int:
    return int(await connection.fetchval("SELECT coalesce(max(alert_id), 0) FROM supervision_alerts"))


async def database_now(connection: asyncpg.Connection) -> datetime:
    """The database's clock (ledger times are Redis TIME; both are the servers' clocks)."""
    moment: datetime = await connection.fetchval("SELECT clock_timestamp()")
    return moment
