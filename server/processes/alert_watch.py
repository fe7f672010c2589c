"""Supervision alerts while nobody watches: a task of the ledger writer process.

The gateway's poller (server/services/supervision.py) runs only while a WatchFunds stream is
open, so that a gateway nobody watches adds nothing beside the authorization path. Alerts must
be raised all the same, for the daily report and for the next person who opens the dashboard:
so the writer process drives the same FundsPoller, without watchers, every
``SUBSIDY_ALERT_CHECK_INTERVAL_S`` (10 s; 0 turns it off): one pipelined Redis read of every
budget, the thresholds, and the merchant surge detector every ``SUBSIDY_SURGE_CHECK_INTERVAL_S``.
On a Redis Cluster deployment (SUBSIDY_REDIS_SHARDS) the budgets are counted in every consumer
shard's key set, not in one Redis's (which no sale touches there): the check reads them summed
over the shards (storage/redis/budget.py ``ShardedBudgetReader``, as the cluster gateway's live
fund view does) over the writer's cluster client, so a threshold crossed by sales in several
shards is raised as on one Redis.
Alerts are keyed in PostgreSQL, so the writer and any gateway noticing the same crossing record
it once. A failure (Redis, the cluster or PostgreSQL unreadable) is logged and tried again at the
next check; it never stops the writer. The writer's /health does not show the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from server.config import Config
from server.domain.daily_report import BusinessCalendar
from server.domain.supervision import SurgeRule
from server.services.supervision import FundsPoller, SupervisionSettings
from storage.postgres.pool import LazyPool
from storage.redis.budget import BudgetReader, BudgetSource, ShardedBudgetReader
from storage.redis.cluster.shards import ShardLayout
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.supervision")


def alert_budgets(config: Config, redis: Redis, cluster: RedisCluster | None) -> BudgetSource:
    """Where the deployment's budgets are counted: with SUBSIDY_REDIS_SHARDS and the writer's
    cluster client, every consumer shard's key set (summed); else one Redis's keys."""
    if cluster is not None and config.redis_shards:
        return ShardedBudgetReader(cluster, ShardLayout(config.redis_prefix, config.redis_shards).keys)
    return BudgetReader(redis, Keys(config.redis_prefix))


def funds_poller(
    config: Config,
    budgets: BudgetSource,
    pool: LazyPool,
    *,
    raised_by: str | None = None,
    ledger_refresh_s: float = 5.0,
    autostart: bool = True,
) -> FundsPoller:
    """The supervision poller with the deployment's settings: a gateway's (driven by its
    watchers, server/processes/app.py and sharded_app.py) or, with ``autostart=False``, the
    writer process's own checks (driven by ``tick``). ``raised_by`` names who records an alert
    (the Redis client name by default)."""
    return FundsPoller(
        budgets,
        pool,
        BusinessCalendar(config.report_timezone, config.report_cutoff),
        SupervisionSettings(
            poll_interval_ms=config.supervision_poll_ms,
            queue_size=config.supervision_queue_size,
            thresholds=config.alert_threshold_percents,
            thresholds_by_campaign=config.alert_threshold_overrides,
            surge=SurgeRule(config.surge_factor, config.surge_min_sales, config.surge_baseline_hours),
            surge_check_interval_s=config.surge_check_interval_s,
            ledger_refresh_s=ledger_refresh_s,
            raised_by=config.redis_client_name if raised_by is None else raised_by,
        ),
        autostart=autostart,
    )


async def run_alert_watch(
    config: Config, redis: Redis, stopping: asyncio.Event, cluster: RedisCluster | None = None
) -> None:
    """Checks every ``SUBSIDY_ALERT_CHECK_INTERVAL_S`` until ``stopping``. ``cluster``: the
    writer's cluster client (its shard ledgers'), given with SUBSIDY_REDIS_SHARDS; the sharded
    reader keeps its own node connections and only uses the client's slot map, so it takes none
    of the connections the client is sized for."""
    if config.alert_check_interval_s == 0:
        return
    budgets = alert_budgets(config, redis, cluster)
    pool = LazyPool(config.pg_dsn, max_size=2)
    poller = funds_poller(
        config, budgets, pool, raised_by=config.writer_consumer, ledger_refresh_s=0.0, autostart=False
    )
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
        if isinstance(budgets, ShardedBudgetReader):
            await budgets.aclose()
