"""Publishing left behind: a task of the ledger writer process.

An operator change commits in PostgreSQL, then its gateway publishes the changed objects to
Redis and clears the change's ``unpublished_changes`` mark (storage/postgres/actions.py). When
that gateway fails between the two (Redis down, the process killed), the mark stays and the
hot path keeps the old rules. Every ``PUBLISH_INTERVAL_S`` this task publishes the marks older
than ``PUBLISH_GRACE_S`` (so it does not race the gateway's own publication), oldest first; a
change that fails again keeps its mark, is retried at the next pass and does not hold up the
others. What is still marked shows in the writer's /metrics (``subsidy_unpublished_changes``,
``subsidy_unpublished_oldest_age_seconds``) and in /health (503 once a mark is older than
``PUBLISH_STUCK_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from storage.postgres import risk_blocks
from storage.postgres.actions import CatchUp, catch_up
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.reference")

PUBLISH_INTERVAL_S = 1.0
PUBLISH_GRACE_S = 2.0
# A mark this old means publishing keeps failing: /health says so.
PUBLISH_STUCK_S = 60.0


@dataclass
class PublishState:
    """The last pass, read by the writer's metrics and health."""

    last: CatchUp = field(default_factory=CatchUp)

    @property
    def stuck(self) -> bool:
        return self.last.oldest_age_s > PUBLISH_STUCK_S


async def run_publisher(
    pg_dsn: str,
    redis: Redis,
    keys: Keys,
    stopping: asyncio.Event,
    state: PublishState,
    interval_s: float = PUBLISH_INTERVAL_S,
) -> None:
    pool: asyncpg.Pool | None = None
    try:
        while not stopping.is_set():
            try:
                if pool is None:
                    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, timeout=10)
                state.last = await catch_up(pool, redis, keys, older_than_s=PUBLISH_GRACE_S)
                if state.last.published:
                    log.info("published %d change(s) their gateway had left unpublished", state.last.published)
            except Exception as error:
                log.warning("publishing left-behind changes failed: %s", type(error).__name__)
            # The block lists: re-published whenever Redis does not hold PostgreSQL's version
            # (a Redis loss, a gateway that failed before publishing), so within about a second.
            try:
                if pool is not None:
                    async with pool.acquire() as connection:
                        if await risk_blocks.sync(connection, redis, keys):
                            log.info("re-published the block lists")
            except Exception as error:
                log.warning("re-publishing the block lists failed: %s", type(error).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)
    finally:
        if pool is not None:
            await pool.close()
