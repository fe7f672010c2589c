"""The sweepers: every gateway process expires due holds and qualifications in the background
(started by ``create_server``, server/processes/app.py); the scripts make concurrent sweepers
safe, and an item whose expiry fails is set aside rather than stalling the sweep
(storage/redis/store.py)."""

from __future__ import annotations

import asyncio
import logging

from server.config import Config
from storage.redis.store import RedisStore

log = logging.getLogger("subsidy.app")


async def run_sweeper(store: RedisStore, config: Config, stopping: asyncio.Event) -> None:
    """Expires due holds and qualifications in every process; the scripts make concurrent
    sweepers safe."""
    while not stopping.is_set():
        try:
            expired = await store.expire_due_holds(config.sweep_batch_size)
            if expired:
                log.info("holds expired", extra={"count": expired})
        except Exception:
            log.warning("hold sweep failed", exc_info=True)
        try:
            expired = await store.expire_due_qualifications(config.qualification_sweep_batch_size)
            if expired:
                log.info("qualifications expired", extra={"count": expired})
        except Exception:
            log.warning("qualification sweep failed", exc_info=True)
        try:
            await asyncio.wait_for(stopping.wait(), config.sweep_interval_ms / 1000)
        except TimeoutError:
            pass
