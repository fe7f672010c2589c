"""Supervision alerts while nobody watches: a task of the ledger writer process.

The gateway's poller (server/services/supervision.py) runs only while a WatchFunds stream is
open, so that a gateway nobody watches adds nothing beside the authorization path. Alerts must
be raised all the same, for the daily report and for the next person who opens the dashboard:
so the writer process drives the same FundsPoller, without watchers, every
``SUBSIDY_ALERT_CHECK_INTERVAL_S`` (10 s; 0 turns it off): one pipelined Redis read of every
budget, the thresholds, and the merchant surge detector every ``SUBSIDY_SURGE_CHECK_INTERVAL_S``.
Alerts are keyed in PostgreSQL, so the writer and any gateway noticing the same crossing record
it once. A failure is logged and tried again at the next check; it never stops the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

from server.config import Config
from server.domain.daily_report import BusinessCalendar
from server.domain.supervision import SurgeRule
from server.services.supervision import FundsPoller, SupervisionSettings
from storage.postgres.pool import LazyPool
from storage.redis.budget import BudgetReader
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.supervision")


def alert_poller(config: Config, redis: Redis, pool: LazyPool, raised_by: str) -> FundsPoller:
    """A FundsPoller for the process's own checks (driven by ``tick``, never by watchers)."""
    return FundsPoller(
        BudgetReader(redis, Keys(config.redis_prefix)),
        pool,
        BusinessCalendar(config.report_timezone, config.report_cutoff),
        SupervisionSettings(
            poll_interval_ms=config.supervision_poll_ms,
            queue_size=config.supervision_queue_size,
            thresholds=config.alert_threshold_percents,
            thresholds_by_campaign=config.alert_threshold_overrides,
            surge=SurgeRule(config.surge_factor, config.surge_min_sales, config.surge_baseline_hours),
            surge_check_interval_s=config.surge_check_interval_s,
            ledger_refresh_s=0.0,
            raised_by=raised_by,
        ),
        autostart=False,
    )


async def run_alert_watch(config: Config, redis: Redis, stopping: asyncio.Event) -> None:
    if config.alert_check_interval_s == 0:
        return
    pool = LazyPool(config.pg_dsn, max_size=2)
    poller = alert_poller(config, redis, pool, config.writer_consumer)
    try:
        while not stopping.is_set():
            try:
                await poller.tick()
            except Exception:
                log.exception("supervision alert check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=config.alert_check_interval_s)
    finally:
        await pool.close()
