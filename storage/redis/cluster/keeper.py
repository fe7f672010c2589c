"""Keeps the consumer shards' budgets funded and balanced while a cluster deployment serves
(issue 16, docs/scale-out.md 2.0 "Running a gateway on the cluster").

The publication (server/commands/reference.py ``publish_snapshot``) records each campaign
category's plan in the deployment's own keys: hash ``{prefix}:shard_plans``, field
``<campaign>|<category>``, value JSON ``{"budget_fen", "tranches", "unit_fen"}`` (tranches as
published: [release ms, cumulative fen]; ``unit_fen`` the most one line of the rule can take).
Every pass of :func:`keep` first completes the campaigns' transfers left half-done
(``ShardBudget.sweep``: debited more than 10 s ago, not settled), then, for each plan:

1. funds the shards with what the schedule has released by now (``ShardBudget.fund``: the same
   target again moves nothing, so a tranche is funded within one pass of its release time);
2. rebalances, bringing any shard whose available is below one unit up to the even level
   (``ShardBudget.rebalance``), so that a crowd hashed to a few shards is not declined while the
   others hold money.

Every gateway process of the deployment runs it; the steps are idempotent and never move money
past the budget, so concurrent keepers can only move more than needed, never too much. Two
keepers either side of a tranche's release instant may fund the lower and the higher target in
turn for one pass (the total dips, then returns); never above the released amount.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson
from redis.asyncio.cluster import RedisCluster

from storage.redis.cluster.shard_budget import ShardBudget, released_fen
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.keeper")
# A transfer debited this long ago and not settled is taken to be abandoned (its keeper stopped).
TRANSFER_ORPHAN_AGE_MS = 10_000


def plans_key(control: Keys) -> str:
    return f"{control.tag}:shard_plans"


@dataclass(frozen=True)
class Plan:
    campaign_id: str
    category: str
    budget_fen: int
    tranches: list[list[int]]
    unit_fen: int
    version: int = 0  # the reference version of the publication that recorded it


async def record_plans(cluster: RedisCluster, control: Keys, plans: list[Plan]) -> None:
    if not plans:
        return
    await cluster.hset(
        plans_key(control),
        mapping={
            f"{plan.campaign_id}|{plan.category}": orjson.dumps(
                {
                    "budget_fen": plan.budget_fen,
                    "tranches": plan.tranches,
                    "unit_fen": plan.unit_fen,
                    "version": plan.version,
                }
            )
            for plan in plans
        },
    )


async def read_plans(cluster: RedisCluster, control: Keys) -> list[Plan]:
    plans = []
    for field, raw in (await cluster.hgetall(plans_key(control))).items():
        campaign_id, _, category = (field.decode() if isinstance(field, bytes) else field).partition("|")
        plan = orjson.loads(raw)
        plans.append(
            Plan(campaign_id, category, plan["budget_fen"], plan["tranches"], plan["unit_fen"], plan.get("version", 0))
        )
    return plans


@dataclass(frozen=True)
class KeptPass:
    funded: int  # plans funded (each a no-op when nothing new was released)
    transfers: int  # transfers made by the rebalances
    moved_fen: int


async def keep(budget: ShardBudget, control: Keys, now_ms: int | None = None) -> KeptPass:
    """One pass over every recorded plan: fund what is released, then rebalance."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    funded = transfers = moved = 0
    plans = await read_plans(budget.cluster, control)
    for campaign_id in sorted({plan.campaign_id for plan in plans}):
        # Transfers left half-done (a keeper stopped between debit and credit): credited once.
        await budget.sweep(campaign_id, min_age_ms=TRANSFER_ORPHAN_AGE_MS)
    for plan in plans:
        released = released_fen(plan.budget_fen, plan.tranches, now_ms)
        await budget.fund(plan.campaign_id, plan.category, released, plan.version)
        funded += 1
        made = await budget.rebalance(plan.campaign_id, plan.category, low_water=max(plan.unit_fen, 1))
        transfers += len(made)
        moved += sum(transfer.amount for transfer in made)
    return KeptPass(funded, transfers, moved)
