"""A campaign's live budget and qualification counters as the scripts keep them: one hash per
campaign (``budget``: ``<category>:reserved``, ``:spent``, ``:refunded``, ``:total``) and its
qualification quota (``<category>:claimed``), read at Redis ``TIME``; on a Redis Cluster
deployment, every consumer shard's pieces of them summed (``ShardedBudgetReader``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.redis.cluster.nodes import NodeConnections
from storage.redis.keys import Keys
from storage.redis.store import text

# The fields of a consumer shard's budget and quota hashes that are its slice of the funding
# (storage/redis/cluster/shard_budget.py: the target applied, the spendable slice itself, the
# plan version), not counts of what was used: summed over the shards they are no deployment
# figure (the shards' :total is the released budget, less what is in transfer, not the
# campaign's budget), so the cluster reader leaves them out.
SHARD_FUNDING_FIELDS = frozenset({"funded", "total", "funded_version"})
# A read of every shard survives these (a redirect, a failover, a dead node): read again with a
# fresh slot map until the deadline (as shard_budget.py's READ_ERRORS, without importing the
# cluster's scripts into every one-Redis process that reads budgets).
SHARD_READ_ERRORS = (
    MovedError,
    AskError,
    TryAgainError,
    ClusterDownError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    SlotNotCoveredError,
)
SHARD_READ_PAUSE_S = 0.05


@dataclass(frozen=True)
class CategoryCounters:
    reserved_fen: int
    spent_fen: int
    refunded_fen: int
    qualifications_claimed: int


@dataclass(frozen=True)
class BudgetCounters:
    """The counters of one campaign, and the Redis time they were read at."""

    as_of_ms: int
    budget: dict[str, int]
    quota: dict[str, int]

    def category(self, category: str) -> CategoryCounters:
        return CategoryCounters(
            reserved_fen=self.budget.get(f"{category}:reserved", 0),
            spent_fen=self.budget.get(f"{category}:spent", 0),
            refunded_fen=self.budget.get(f"{category}:refunded", 0),
            qualifications_claimed=self.quota.get(f"{category}:claimed", 0),
        )


async def read_budget(redis: Redis, keys: Keys, campaign_id: str) -> BudgetCounters:
    seconds, microseconds = await redis.time()
    now_ms = seconds * 1000 + microseconds // 1000
    raw = await redis.hgetall(keys.budget(campaign_id))
    budget = {text(key): int(value) for key, value in raw.items()}
    raw = await redis.hgetall(keys.qualification_quota(campaign_id))
    quota = {text(key): int(value) for key, value in raw.items()}
    return BudgetCounters(now_ms, budget, quota)


async def read_budgets(redis: Redis, keys: Keys, campaign_ids: Sequence[str]) -> BudgetCounters:
    """Every campaign's counters in ONE round trip: a non-transactional pipeline of TIME and,
    per campaign, HGETALL of its budget and qualification-quota hashes (a handful of fields
    each). Plain reads, no MULTI and no script: nothing waits behind them on the hot path's
    keys except the few microseconds each HGETALL takes in Redis's own loop. Returns the
    counters keyed ``<campaign>:<field>`` (``c-main:fridge:spent``) in one BudgetCounters."""
    pipe = redis.pipeline(transaction=False)
    pipe.time()
    for campaign_id in campaign_ids:
        pipe.hgetall(keys.budget(campaign_id))
        pipe.hgetall(keys.qualification_quota(campaign_id))
    replies = await pipe.execute()
    seconds, microseconds = replies[0]
    budget: dict[str, int] = {}
    quota: dict[str, int] = {}
    for index, campaign_id in enumerate(campaign_ids):
        for target, raw in ((budget, replies[1 + 2 * index]), (quota, replies[2 + 2 * index])):
            for key, value in raw.items():
                target[f"{campaign_id}:{text(key)}"] = int(value)
    return BudgetCounters(seconds * 1000 + microseconds // 1000, budget, quota)


@dataclass(frozen=True)
class BudgetReader:
    """Reads every budget of a deployment (``read_budgets``) for live supervision, so that the
    servicer layer holds a reader rather than a Redis client."""

    redis: Redis
    keys: Keys

    async def read(self, campaign_ids: Sequence[str]) -> BudgetCounters:
        return await read_budgets(self.redis, self.keys, campaign_ids)


class BudgetSource(Protocol):
    """What live supervision reads budgets through: one Redis's (``BudgetReader``) or a Redis
    Cluster deployment's shards' (``ShardedBudgetReader``)."""

    async def read(self, campaign_ids: Sequence[str]) -> BudgetCounters: ...


class ShardedBudgetReader:
    """Every budget of a Redis Cluster deployment (issue 16) as one Redis would hold it, for live
    supervision on the cluster gateway.

    Each consumer shard (``shards``: storage/redis/cluster/shards.py ``ShardLayout.keys``) holds
    a slice of every campaign category's budget and quota and counts its own consumers' use of
    it in its ``keys.budget(campaign)`` and ``keys.qualification_quota(campaign)`` hashes. One
    read takes them all in ONE pipelined round trip per primary (the shards it serves), all
    primaries at once, as shard_budget.py reads every shard: plain HGETALLs on plain node
    connections, no script, nothing the sale path waits behind; and TIME on the node of shard 0
    in the same pipeline (``as_of_ms``: one node's clock, as one Redis's). The used fields
    (``<category>:reserved``, ``:spent``, ``:refunded``, ``:clawed_back``, ``:claimed``, a
    pack's ``pack:<id>:claimed``) are summed over the shards; the shard's own funding fields
    (``SHARD_FUNDING_FIELDS``) are left out. Supervision computes nothing from ``:total``: the
    budget, the released amount and what remains come from the PostgreSQL plan
    (supervision_store.budget_plans) and these used counts, so it shows the same numbers for the
    same sales as on one Redis.

    The shards are not read at one instant (a sale may complete between two primaries' reads),
    as one Redis's reads are not either beside a live sale path: each figure is exact as of its
    shard's read. After a redirect, a failover or a dead node the read is retried with a fresh
    slot map until ``deadline_s``, then fails (the poller logs it and keeps the last snapshot)."""

    def __init__(self, cluster: RedisCluster, shards: Sequence[Keys], *, deadline_s: float = 5.0) -> None:
        if not shards:
            raise ValueError("a sharded budget reader needs at least one shard")
        self.shards = tuple(shards)
        self.deadline_s = deadline_s
        self._nodes = NodeConnections(cluster)
        self.retried = 0

    async def read(self, campaign_ids: Sequence[str]) -> BudgetCounters:
        deadline = time.monotonic() + self.deadline_s
        while True:
            try:
                return await self._read(campaign_ids)
            except SHARD_READ_ERRORS:
                if time.monotonic() >= deadline:
                    raise
                self.retried += 1
                await self._nodes.drop_dead()
                await asyncio.sleep(SHARD_READ_PAUSE_S)
                try:
                    await self._nodes.refresh_map()
                except SHARD_READ_ERRORS:
                    pass  # the next attempt reads with the map it has, or fails the same way

    async def _read(self, campaign_ids: Sequence[str]) -> BudgetCounters:
        await self._nodes.load_map()
        by_node: dict[tuple[str, int], list[int]] = {}
        for shard, keys in enumerate(self.shards):
            by_node.setdefault(self._nodes.address_of(keys.holds), []).append(shard)
        parts = await asyncio.gather(
            *(self._read_node(address, shards, campaign_ids) for address, shards in by_node.items())
        )
        as_of_ms = 0
        budget: dict[str, int] = {}
        quota: dict[str, int] = {}
        for now_ms, replies in parts:
            as_of_ms = now_ms if now_ms is not None else as_of_ms
            for shard_replies in replies:
                for index, campaign_id in enumerate(campaign_ids):
                    for target, raw in ((budget, shard_replies[2 * index]), (quota, shard_replies[2 * index + 1])):
                        for key, value in raw.items():
                            name = text(key)
                            if name.rsplit(":", 1)[-1] in SHARD_FUNDING_FIELDS:
                                continue
                            field = f"{campaign_id}:{name}"
                            target[field] = target.get(field, 0) + int(value)
        return BudgetCounters(as_of_ms, budget, quota)

    async def _read_node(
        self, address: tuple[str, int], shards: list[int], campaign_ids: Sequence[str]
    ) -> tuple[int | None, list[list[Any]]]:
        """One primary's shards in one pipeline (with TIME first on shard 0's): the replies of
        each shard, two per campaign (budget, quota)."""
        timed = 0 in shards
        async with self._nodes.at(*address).pipeline(transaction=False) as pipe:
            if timed:
                pipe.time()
            for shard in shards:
                keys = self.shards[shard]
                for campaign_id in campaign_ids:
                    pipe.hgetall(keys.budget(campaign_id))
                    pipe.hgetall(keys.qualification_quota(campaign_id))
            flat = await pipe.execute()
        now_ms = None
        if timed:
            seconds, microseconds = flat.pop(0)
            now_ms = int(seconds) * 1000 + int(microseconds) // 1000
        per_shard = 2 * len(campaign_ids)
        return now_ms, [flat[index * per_shard : (index + 1) * per_shard] for index in range(len(shards))]

    async def aclose(self) -> None:
        await self._nodes.aclose()
