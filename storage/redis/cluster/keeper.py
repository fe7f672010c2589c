"""Keeps the consumer shards' budgets and qualification quotas funded and balanced while a
cluster deployment serves (issue 16, docs/scale-out.md 2.0 "Running a gateway on the cluster").

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

The quota is kept the same way (``ShardBudget.quota``, shard_budget.py ShardQuota), in vouchers:
the publication also records, in hash ``{prefix}:shard_quota_plans`` (its own hash, so that a
keeper of an older release never reads a quota as a budget), field ``<campaign>|<category>`` or
``<campaign>|pack:<pack id>``, value JSON ``{"quota", "tranches", "version"}`` (the rule's
``q_quota`` and ``q_tranches``, a pack's ``q`` and ``qt``, as claim_qualification.lua reads them:
[release ms, cumulative count]). Each pass sweeps the quota transfers, funds each shard's part of
the quota released by now and rebalances any shard with less than one voucher (or pack) left.

Every gateway process of the deployment runs it; the steps are idempotent and never move money
past the budget, so concurrent keepers can only move more than needed, never too much. Two
keepers either side of a tranche's release instant may fund the lower and the higher target in
turn for one pass (the total dips, then returns); never above the released amount.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from redis.asyncio.cluster import RedisCluster

from storage.redis.cluster.shard_budget import ShardBudget, ShardQuota, released_fen
from storage.redis.keys import Keys

log = logging.getLogger("subsidy.keeper")
# A transfer debited this long ago and not settled is taken to be abandoned (its keeper stopped).
TRANSFER_ORPHAN_AGE_MS = 10_000


def plans_key(control: Keys) -> str:
    return f"{control.tag}:shard_plans"


def quota_plans_key(control: Keys) -> str:
    return f"{control.tag}:shard_quota_plans"


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
class QuotaPlan:
    """The qualification quota of a campaign's category, or of one of its voucher packs."""

    campaign_id: str
    category: str  # a rule's category, or "pack:<pack id>" (ShardQuota's subject)
    quota: int  # vouchers (a pack's: packs)
    tranches: list[list[int]]  # [release ms, cumulative count], as claim_qualification.lua reads them
    version: int = 0  # the reference version of the publication that recorded it


async def record_quota_plans(cluster: RedisCluster, control: Keys, plans: list[QuotaPlan]) -> None:
    if not plans:
        return
    await cluster.hset(
        quota_plans_key(control),
        mapping={
            f"{plan.campaign_id}|{plan.category}": orjson.dumps(
                {"quota": plan.quota, "tranches": plan.tranches, "version": plan.version}
            )
            for plan in plans
        },
    )


async def read_quota_plans(cluster: RedisCluster, control: Keys) -> list[QuotaPlan]:
    plans = []
    for field, raw in (await cluster.hgetall(quota_plans_key(control))).items():
        campaign_id, _, category = (field.decode() if isinstance(field, bytes) else field).partition("|")
        plan = orjson.loads(raw)
        plans.append(QuotaPlan(campaign_id, category, plan["quota"], plan["tranches"], plan.get("version", 0)))
    return plans


def released_quota(plan: QuotaPlan, now_ms: int) -> int:
    """What the plan's schedule has released by ``now_ms``: released_fen's rule (the one
    claim_qualification.lua applies), in vouchers."""
    return released_fen(plan.quota, plan.tranches, now_ms)


async def fund_quotas(quota: ShardQuota, plans: list[QuotaPlan], now_ms: int) -> None:
    """Each plan's released quota split over the shards (at the publication and in every pass)."""
    for plan in plans:
        await quota.fund(plan.campaign_id, plan.category, released_quota(plan, now_ms), plan.version)


@dataclass(frozen=True)
class KeptPass:
    funded: int  # plans funded (each a no-op when nothing new was released)
    transfers: int  # transfers made by the rebalances
    moved_fen: int
    quota_funded: int = 0  # quota plans funded
    quota_transfers: int = 0  # quota transfers made by the rebalances
    moved_vouchers: int = 0  # what they moved, in vouchers (a pack's in packs): never money


async def cluster_time_ms(budget: ShardBudget, control: Keys) -> int:
    """The deployment's clock for tranche release times: Redis TIME on the primary of its own
    keys (where the plans are), not the calling process's clock. Every keeper and publication
    then funds a tranche at the same instant, however skewed the gateways' clocks are (a
    gateway clock ahead by a minute would fund a tranche a minute early)."""
    return await budget.server_time_ms(plans_key(control))


async def keep(budget: ShardBudget, control: Keys, now_ms: int | None = None) -> KeptPass:
    """One pass over every recorded plan: fund what is released, then rebalance; the budgets,
    then the quotas (``budget.quota``)."""
    now_ms = await cluster_time_ms(budget, control) if now_ms is None else now_ms
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
    quota = budget.quota
    quota_plans = await read_quota_plans(budget.cluster, control)
    quota_transfers = moved_vouchers = 0
    for campaign_id in sorted({plan.campaign_id for plan in quota_plans}):
        await quota.sweep(campaign_id, min_age_ms=TRANSFER_ORPHAN_AGE_MS)
    for quota_plan in quota_plans:
        await fund_quotas(quota, [quota_plan], now_ms)
        # One more claim needs one voucher (a pack claim, one pack).
        made = await quota.rebalance(quota_plan.campaign_id, quota_plan.category, low_water=1)
        quota_transfers += len(made)
        moved_vouchers += sum(transfer.amount for transfer in made)
    return KeptPass(funded, transfers, moved, len(quota_plans), quota_transfers, moved_vouchers)
