"""make run's report demo (server/commands/report_demo.py): one simulated closed day of the
paused demo-history campaign, written once, with Redis counters the ledger agrees with, and a
report the scheduler publishes with the demo merchants' names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import yaml
from redis.asyncio import Redis

from server.commands.report_demo import DEMO_CAMPAIGN, seed_demo_day
from server.domain.daily_report import BusinessCalendar
from storage.devenv import Services
from storage.postgres import daily_reports
from storage.postgres.audit import ledger_counters, reconcile
from tests.conftest import ROOT, isolated_environment, load_document

DEMO_FILE = ROOT / "examples" / "demo.yaml"


async def test_the_demo_day_is_written_once_reconciles_and_publishes(services: Services) -> None:
    async with isolated_environment(services) as env:
        await load_document(env, yaml.safe_load(DEMO_FILE.read_text()))
        config = env.config()
        calendar = BusinessCalendar(config.report_timezone, config.report_cutoff)
        now = datetime.now(UTC)
        day = await seed_demo_day(config, now)
        assert day == calendar.last_closed_day(now)
        assert await seed_demo_day(config, now) is None  # once only
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        redis = Redis.from_url(env.redis_url)
        try:
            assert await reconcile(connection, redis, env.keys) == []
            result = await daily_reports.publish_closed_days(connection, calendar, now, "scheduler")
            assert result.published[0].business_date == day
            async with daily_reports.reading(connection):
                rows = [row async for row in daily_reports.stream_rows(connection, day)]
                budgets = [line async for line in daily_reports.stream_budgets(connection, day)]
            merchants = {row.merchant_name for row in rows if row.level == "MERCHANT"}
            assert "国美电器萧山店" in merchants and "萧山数码港" in merchants
            demo = [line for line in budgets if line.campaign_id == DEMO_CAMPAIGN]
            assert {line.category for line in demo} == {"fridge", "washer", "phone"}
            assert sum(line.captured_fen for line in demo) > 0
            assert sum(line.refunded_fen for line in demo) > 0
            # Every hold of the day was settled within the hour after it: nothing stays held.
            counters = await ledger_counters(connection)
            assert not [
                value
                for key, value in counters.budget.items()
                if key[0] == DEMO_CAMPAIGN and key[2] == "reserved" and value
            ]
            # Once a report exists, a later run writes no demo day (it would be a late event).
            assert await seed_demo_day(config, now + timedelta(days=3)) is None
        finally:
            await connection.close()
            await redis.aclose()
