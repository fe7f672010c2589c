"""The sweepers: every gateway process expires due holds and qualifications in the background
(started by ``create_server``, server/processes/app.py); the scripts make concurrent sweepers
safe, and an item whose expiry fails is set aside rather than stalling the sweep
(storage/redis/store.py). A cluster gateway sweeps each shard's holds and keeps the shards'
budgets funded (server/processes/sharded_app.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

from server.config import Config
from server.rpc.metrics import SWEEPER_BACKLOG, SWEEPER_EXPIRED
from storage.redis.store import RedisStore, sweep_backlog

log = logging.getLogger("subsidy.app")


# The backlog gauge is refreshed every this many sweeps (one pipelined round trip).
BACKLOG_EVERY_SWEEPS = 10

Step = tuple[str, Callable[[], Awaitable[None]]]


async def sweep_forever(steps: Sequence[Step], interval_ms: int, stopping: asyncio.Event) -> None:
    """Runs each step in turn every ``interval_ms`` until ``stopping``; a step that fails is
    logged (``<name> failed``) and the others still run: the next sweep tries it again."""
    while not stopping.is_set():
        for name, step in steps:
            try:
                await step()
            except Exception:
                log.warning(f"{name} failed", exc_info=True)
        try:
            await asyncio.wait_for(stopping.wait(), interval_ms / 1000)
        except TimeoutError:
            pass


def expiring(kind: str, expire: Callable[[], Awaitable[int]]) -> Step:
    """A step expiring one kind of item (``hold``, ``qualification``), counted and logged."""

    async def step() -> None:
        expired = await expire()
        if expired:
            SWEEPER_EXPIRED.labels(kind).inc(expired)
            log.info(f"{kind}s expired", extra={"count": expired})

    return f"{kind} sweep", step


async def run_sweeper(store: RedisStore, config: Config, stopping: asyncio.Event) -> None:
    """Expires due holds and qualifications in every process; the scripts make concurrent
    sweepers safe. Every BACKLOG_EVERY_SWEEPS sweeps, the backlog gauge."""
    sweeps = 0

    async def read_backlog() -> None:
        nonlocal sweeps
        sweeps += 1
        if sweeps % BACKLOG_EVERY_SWEEPS == 1:
            backlog = await sweep_backlog(store.redis, store.keys)
            for kind, value in dataclasses.asdict(backlog).items():
                SWEEPER_BACKLOG.labels(kind).set(value)

    steps = [
        expiring("hold", lambda: store.expire_due_holds(config.sweep_batch_size)),
        expiring("qualification", lambda: store.expire_due_qualifications(config.qualification_sweep_batch_size)),
        ("sweep backlog read", read_backlog),
    ]
    await sweep_forever(steps, config.sweep_interval_ms, stopping)
