"""make run's report demo: one simulated business day in the ledger, so a daily report exists at
once (README, "T+1 daily reports").

The first ``make run`` that finds no published report and nothing yet in the ledger for
``demo-history-2026`` (a paused campaign of examples/demo.yaml: no live sale touches it)
writes a day of simulated sales at the demo's Xiaoshan merchants through the ledger writer's
own path (server/domain/ledger_sim.py: captures, voids, expiries, whole and partial refunds,
every hold settled), on the last closed business day, and sets that campaign's Redis counters
to the ledger's (``server.ledger reconcile`` stays clean). The writer's scheduler then
publishes the day within a minute of starting. Later runs change nothing.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import asyncpg
from redis.asyncio import Redis

from server.config import Config
from server.domain.daily_report import BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from storage.postgres import daily_reports
from storage.postgres.audit import ledger_counters
from storage.redis.keys import Keys
from storage.redis.simulated import set_campaign_counters

DEMO_CAMPAIGN = "demo-history-2026"
DEMO_MERCHANTS = ("m-suning-xiaoshan", "m-gome-xiaoshan", "m-xiaoshan-appliance-city", "m-xiaoshan-digital")
DEMO_PAYMENTS = 400
HOUR_MS = 3_600_000


async def seed_demo_day(config: Config, now: datetime | None = None) -> date | None:
    """Writes the demo day when due; returns its date, or None when nothing was written."""
    calendar = BusinessCalendar(config.report_timezone, config.report_cutoff)
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    redis = Redis.from_url(config.redis_url)
    try:
        if await daily_reports.last_published_day(connection) is not None:
            return None
        if not await daily_reports.campaign_is_empty(connection, DEMO_CAMPAIGN):
            return None
        day = calendar.last_closed_day(now or datetime.now(UTC))
        start, end = (int(moment.timestamp() * 1000) for moment in calendar.bounds(day))
        settings = SimSettings(
            campaigns=(SimCampaign(DEMO_CAMPAIGN, ("fridge", "washer", "phone"), rate_bp=1500, cap_fen=200_000),),
            merchants=DEMO_MERCHANTS,
            seed=day.toordinal(),
            consumers=300,
            refund_share=0.25,
            partial_refund_share=0.3,
            serial_prefix="DEMO",
        )
        # Every hold of the day settled within the hour after it (a capture, a void or an expiry).
        events = list(simulate(settings, start, end, DEMO_PAYMENTS, until_ms=end + HOUR_MS))
        await daily_reports.write_simulated(connection, events)
        authorizations = {payload["authorization_id"] for _, payload in events}
        counters = await ledger_counters(connection)
        budget = {(key[1], key[2]): value for key, value in counters.budget.items() if key[0] == DEMO_CAMPAIGN}
        usage = {(key[1], key[2]): units for key, units in counters.usage.items() if key[0] == DEMO_CAMPAIGN}
        serials = {serial: owner for serial, owner in counters.serials.items() if owner in authorizations}
        await set_campaign_counters(redis, Keys(config.redis_prefix), DEMO_CAMPAIGN, budget, usage, serials)
        return day
    finally:
        await connection.close()
        await redis.aclose()
