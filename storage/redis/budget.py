"""A campaign's live budget and qualification counters as the scripts keep them: one hash per
campaign (``budget``: ``<category>:reserved``, ``:spent``, ``:refunded``, ``:total``) and its
qualification quota (``<category>:claimed``), read at Redis ``TIME``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from storage.redis.keys import Keys
from storage.redis.store import text


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
