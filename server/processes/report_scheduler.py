"""The daily-report scheduler, a task of the ledger writer process (``run_writer``).

Every ``SUBSIDY_REPORT_CHECK_INTERVAL_S`` it compares the newest published report with the
last closed business day (``SUBSIDY_REPORT_TIMEZONE``, ``SUBSIDY_REPORT_CUTOFF``) and, when
behind, publishes every missing day in order (storage/postgres/daily_reports.py): right after
each cut-off, and all the days missed after downtime when the process comes back. Any number
of writer processes may run it: publishing takes an advisory lock and never cuts a published
day again.

Before cutting, it lets the ledger catch up: while the Redis stream still holds events from
before the end of the day being closed (the writer is behind), it waits, for at most
``DRAIN_WAIT_S`` past the cut-off; after that it publishes anyway, and what was still on its
way appears in the next day's report as an adjustment. A failure (PostgreSQL away, a report
that does not tie out) is logged and tried again at the next check; it never stops the writer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
from redis.asyncio import Redis

from server.config import Config
from server.domain.daily_report import SCHEDULER, BusinessCalendar
from storage.postgres import daily_reports, risk, risk_cases
from storage.postgres.writer import lag
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.reports")
DRAIN_WAIT_S = 3600
LEDGER_GROUP = "ledger-writer"


@dataclass(frozen=True)
class Tick:
    """What one check did: the days it published, or why it waited."""

    published: tuple[str, ...] = ()
    waiting_for_ledger: bool = False


async def detect_risk(connection: asyncpg.Connection, calendar: BusinessCalendar, days: list[date]) -> None:
    """The offline risk detectors (issue 14, section 2) over each day just published, its new
    findings recorded as cases. A failure is logged and leaves the published reports as they
    are; ``subsidyctl risk detect --from DAY --to DAY`` runs the day again (no duplicate cases)."""
    for day in days:
        window = risk.Window(*calendar.bounds(day))
        try:
            found = await risk.detect(connection, window)
            recorded = await risk_cases.record_findings(connection, window, found, SCHEDULER)
        except Exception:
            log.error("risk detection failed", extra={"day": day.isoformat()}, exc_info=True)
            continue
        log.info("risk detection ran", extra={"day": day.isoformat(), "new_cases": len(recorded.created)})


class ReportScheduler:
    def __init__(self, config: Config, redis: Redis, keys: Keys) -> None:
        self._config = config
        self._redis = redis
        self._keys = keys
        self.calendar = BusinessCalendar(config.report_timezone, config.report_cutoff)

    async def _ledger_behind(self, day_end: datetime, now: datetime) -> bool:
        """Whether the stream still holds an unwritten event from before ``day_end``."""
        current = await lag(self._redis, self._keys, LEDGER_GROUP)
        if current.backlog == 0:
            return False
        oldest = now - timedelta(seconds=current.oldest_unwritten_age_s)
        return oldest < day_end

    async def tick(self, now: datetime | None = None) -> Tick:
        now = now or datetime.now(UTC)
        last_closed = self.calendar.last_closed_day(now)
        connection = await asyncpg.connect(self._config.pg_dsn, timeout=10)
        try:
            published = await daily_reports.last_published_day(connection)
            if published is not None and published >= last_closed:
                return Tick()
            if now < self.calendar.closes_at(last_closed) + timedelta(seconds=DRAIN_WAIT_S):
                if await self._ledger_behind(self.calendar.bounds(last_closed)[1], now):
                    log.info("daily report waits for the ledger to drain", extra={"day": last_closed.isoformat()})
                    return Tick(waiting_for_ledger=True)
            result = await daily_reports.publish_closed_days(connection, self.calendar, now, SCHEDULER)
            await detect_risk(connection, self.calendar, [header.business_date for header in result.published])
        finally:
            await connection.close()
        days = tuple(header.business_date.isoformat() for header in result.published)
        for header in result.published:
            log.info(
                "daily report published",
                extra={
                    "day": header.business_date.isoformat(),
                    "rows": header.row_count,
                    "adjustment_rows": header.adjustment_rows,
                    "content_hash": header.content_hash,
                },
            )
        return Tick(published=days)

    async def run(self, stopping: asyncio.Event) -> None:
        interval = self._config.report_check_interval_s
        log.info(
            "daily report scheduler started",
            extra={"timezone": self.calendar.timezone, "cutoff": self.calendar.cutoff, "interval_s": interval},
        )
        while not stopping.is_set():
            try:
                await self.tick()
            except Exception:  # PostgreSQL away, a report that does not tie out: try again later
                log.error("daily report publication failed; will retry", exc_info=True)
            try:
                await asyncio.wait_for(stopping.wait(), interval)
            except TimeoutError:
                pass
