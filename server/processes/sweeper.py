"""The sweepers: every gateway process expires due holds and qualifications in the background
(started by ``create_server``, server/processes/app.py); the scripts make concurrent sweepers
safe, and an item whose expiry fails is set aside rather than stalling the sweep
(storage/redis/store.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from server.config import Config
from server.rpc.metrics import SWEEPER_BACKLOG, SWEEPER_EXPIRED
from storage.redis.store import RedisStore, sweep_backlog

log = logging.getLogger("subsidy.app")


# The backlog gauge is refreshed every this many sweeps (one pipelined round trip).
BACKLOG_EVERY_SWEEPS = 10


async def run_sweeper(store: RedisStore, config: Config, stopping: asyncio.Event) -> None:
    """Expires due holds and qualifications in every process; the scripts make concurrent
    sweepers safe."""
    sweeps = 0
    while not stopping.is_set():
        try:
            expired = await store.expire_due_holds(config.sweep_batch_size)
            if expired:
                SWEEPER_EXPIRED.labels("hold").inc(expired)
                log.info("holds expired", extra={"count": expired})
        except Exception:
            log.warning("hold sweep failed", exc_info=True)
        try:
            expired = await store.expire_due_qualifications(config.qualification_sweep_batch_size)
            if expired:
                SWEEPER_EXPIRED.labels("qualification").inc(expired)
                log.info("qualifications expired", extra={"count": expired})
        except Exception:
            log.warning("qualification sweep failed", exc_info=True)
        if sweeps % BACKLOG_EVERY_SWEEPS == 0:
            try:
                backlog = await sweep_backlog(store.redis, store.keys)
                for kind, value in dataclasses.asdict(backlog).items():
                    SWEEPER_BACKLOG.labels(kind).set(value)
            except Exception:
                log.warning("sweep backlog not read", exc_info=True)
        sweeps += 1
        try:
            await asyncio.wait_for(stopping.wait(), config.sweep_interval_ms / 1000)
        except TimeoutError:
            pass
