"""Offline risk detection's jobs (issue 14, section 2), for ``subsidyctl risk`` and the daily
report scheduler: detection over business days of the ledger, and the risk team's case work.
They talk to PostgreSQL directly (storage/postgres/risk.py, storage/postgres/risk_cases.py).

A business day is a calendar day in the report time zone (SUBSIDY_REPORT_TIMEZONE), the daily
reports' day; each day is its own window, so a case found on one day is one case however often
that day is examined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, timedelta
from typing import Any

import asyncpg

from server.domain.daily_report import BusinessCalendar
from server.domain.risk_detection import DETECTORS
from storage.postgres import risk, risk_cases

DAYS_MAX = 366


def day_window(calendar: BusinessCalendar, day: date) -> risk.Window:
    start, end = calendar.bounds(day)
    return risk.Window(start, end)


async def detect_days(
    connection: asyncpg.Connection,
    calendar: BusinessCalendar,
    first: date,
    last: date,
    detected_by: str,
    detectors: Sequence[str] = DETECTORS,
    progress: Callable[[str, int, float], None] | None = None,
) -> dict[str, Any]:
    """Runs the detectors over each day of [first, last] and records new cases; a summary."""
    if last < first:
        raise ValueError("--to is before --from")
    if (last - first).days + 1 > DAYS_MAX:
        raise ValueError(f"at most {DAYS_MAX} days at a time")
    days: list[dict[str, Any]] = []
    day = first
    while day <= last:
        window = day_window(calendar, day)

        def report(name: str, found: int, seconds: float, day: date = day) -> None:
            if progress is not None:
                progress(f"{day.isoformat()} {name}", found, seconds)

        findings = await risk.detect(connection, window, detectors, report)
        recorded = await risk_cases.record_findings(connection, window, findings, detected_by)
        days.append(
            {
                "day": day.isoformat(),
                "found": {name: len(found) for name, found in findings.items()},
                "new_cases": recorded.created,
                "already_cases": recorded.already,
            }
        )
        day += timedelta(days=1)
    return {
        "from": first.isoformat(),
        "to": last.isoformat(),
        "new_cases": sum(len(item["new_cases"]) for item in days),
        "already_cases": sum(item["already_cases"] for item in days),
        "days": days,
    }
