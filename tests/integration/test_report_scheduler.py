"""The daily-report scheduler of the ledger writer process (server/processes/report_scheduler.py):
it publishes each day once its cut-off has passed, catches up every day missed while it was
down, waits (a bounded time) while the ledger stream still holds events of the day being
closed, and runs inside ``python -m server.ledger writer``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta

import asyncpg
from redis.asyncio import Redis

from server.domain.daily_report import SCHEDULER, BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.processes.report_scheduler import DRAIN_WAIT_S, ReportScheduler
from storage.devenv import Services
from storage.postgres import daily_reports
from tests.conftest import ROOT, Environment, isolated_environment

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@asynccontextmanager
async def ledger_with_days(services: Services, first: date, days: int) -> AsyncIterator[Environment]:
    async with isolated_environment(services) as env:
        settings = SimSettings(campaigns=(SimCampaign("c-main", ("fridge", "tv")),), merchants=("m-main", "m-other"))
        start = ms(CALENDAR.bounds(first)[0])
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await daily_reports.write_simulated(connection, simulate(settings, start, start + days * 86_400_000, 300))
        finally:
            await connection.close()
        yield env


async def published(env: Environment) -> list[tuple[date, str]]:
    connection = await asyncpg.connect(env.pg_dsn, timeout=10)
    try:
        rows = await connection.fetch("SELECT business_date, published_by FROM daily_reports ORDER BY business_date")
    finally:
        await connection.close()
    return [(row["business_date"], row["published_by"]) for row in rows]


async def test_each_day_after_its_cutoff_and_missed_days_caught_up(services: Services) -> None:
    first = date(2026, 3, 1)
    async with ledger_with_days(services, first, 3) as env:
        redis = Redis.from_url(env.redis_url)
        try:
            scheduler = ReportScheduler(env.config(), redis, env.keys)
            before = CALENDAR.closes_at(first) - timedelta(seconds=1)
            assert (await scheduler.tick(before)).published == ()
            assert (await scheduler.tick(CALENDAR.closes_at(first))).published == ("2026-03-01",)
            # Down for two days: the next check publishes both missing days, in order.
            later = CALENDAR.closes_at(first + timedelta(days=2)) + timedelta(hours=5)
            assert (await scheduler.tick(later)).published == ("2026-03-02", "2026-03-03")
            assert (await scheduler.tick(later)).published == ()
            assert await published(env) == [(first + timedelta(days=n), SCHEDULER) for n in range(3)]
        finally:
            await redis.aclose()


async def test_it_waits_for_the_ledger_to_drain_for_a_bounded_time(services: Services) -> None:
    first = date(2026, 3, 1)
    async with ledger_with_days(services, first, 1) as env:
        redis = Redis.from_url(env.redis_url)
        try:
            # An event of the day's last minute still in the stream (the writer is behind).
            end = CALENDAR.bounds(first)[1]
            await redis.xadd(env.keys.ledger, {"e": b"{}"}, id=f"{ms(end) - 60_000}-0")
            scheduler = ReportScheduler(env.config(), redis, env.keys)
            closes = CALENDAR.closes_at(first)
            waiting = await scheduler.tick(closes + timedelta(minutes=1))
            assert waiting.waiting_for_ledger and waiting.published == ()
            assert await published(env) == []
            # Past the bounded wait it publishes anyway; the event will be an adjustment.
            done = await scheduler.tick(closes + timedelta(seconds=DRAIN_WAIT_S + 1))
            assert done.published == ("2026-03-01",)
        finally:
            await redis.aclose()


async def test_the_ledger_writer_process_publishes_closed_days(services: Services) -> None:
    """``python -m server.ledger writer`` runs the scheduler: days that closed while nothing
    ran are published within a check interval of its start."""
    first = CALENDAR.day_of(datetime.now(UTC)) - timedelta(days=5)
    async with ledger_with_days(services, first, 2) as env:
        environ = {
            **os.environ,
            "SUBSIDY_PG_DSN": env.pg_dsn,
            "SUBSIDY_REDIS_URL": env.redis_url,
            "SUBSIDY_REDIS_PREFIX": env.prefix,
            "SUBSIDY_REPORT_CHECK_INTERVAL_S": "1",
            "SUBSIDY_LOG_LEVEL": "WARNING",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.ledger", "writer", cwd=ROOT, env=environ
        )
        try:
            expected = CALENDAR.last_closed_day(datetime.now(UTC))
            for _ in range(300):
                reports = await published(env)
                if reports and reports[-1][0] >= expected:
                    break
                await asyncio.sleep(0.1)
            assert reports[0] == (first, SCHEDULER)
            assert reports[-1][0] == expected
            assert [day for day, _ in reports] == [first + timedelta(days=n) for n in range(len(reports))]
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
