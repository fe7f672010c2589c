"""Reference data tasks (``subsidyctl reference load|publish``, server/ctl/reference.py;
``python -m server.reference`` is their alias).

``load`` validates a YAML or JSON file, upserts it into PostgreSQL in one transaction,
publishes everything to Redis and writes the callers' credentials to a file readable only by
its owner. ``publish`` rebuilds the Redis reference cache from PostgreSQL. With
SUBSIDY_REDIS_SHARDS both publish into every consumer shard of the Redis Cluster and fund the
shards' budgets and qualification quotas (``publish_snapshot``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import yaml
from redis.asyncio import Redis

from server.config import Config, cluster_nodes
from server.domain.reference import ReferenceData, ReferenceError, parse_reference
from storage.postgres.migrate import migrate
from storage.postgres.reference import ReferenceSnapshot, fetch_reference, save_reference
from storage.redis.cluster.keeper import Plan, QuotaPlan, cluster_time_ms, fund_quotas, record_plans, record_quota_plans
from storage.redis.cluster.nodes import cluster_client
from storage.redis.cluster.shard_budget import ShardBudget, released_fen
from storage.redis.cluster.shards import ShardLayout, publish_to_shards
from storage.redis.keys import Keys
from storage.redis.reference import publish_reference, tranche_schedule


async def publish_snapshot(config: Config, snapshot: ReferenceSnapshot) -> int:
    """Publishes to one Redis, or with SUBSIDY_REDIS_SHARDS to every consumer shard of the Redis
    Cluster and funds each shard's slice of every campaign category's released budget and of
    every released qualification quota, a category's or a voucher pack's (docs/scale-out.md 2.0
    and "Funding the shards"); returns the reference version.

    The quotas are funded once before the rules are written too (at the version the shards
    have): a shard's quota hash without ``<category>:total`` lets claim_qualification.lua issue
    the whole released quota, as on one Redis, so no shard may hold a rule its quota is not
    funded for. (A budget needs no such step: without ``:total`` a shard approves nothing.)"""
    if config.redis_shards:
        refuse_cross_shard_rules(snapshot.campaigns)
    if not config.redis_shards:
        redis = Redis.from_url(config.redis_url)
        try:
            return await publish_reference(redis, Keys(config.redis_prefix), snapshot)
        finally:
            await redis.aclose()
    cluster = cluster_client(cluster_nodes(config.redis_cluster_nodes), timeout_s=config.redis_timeout_s)
    budget = ShardBudget(cluster, ShardLayout(config.redis_prefix, config.redis_shards))
    try:
        control = budget.layout.control
        now_ms = await cluster_time_ms(budget, budget.layout.control)
        # At the version this publication will most likely get: a keeper still holding the
        # previous plans (recorded at ``before``) is then ignored by every shard rather than
        # restoring a quota this publication lowers (equal versions: the last call wins).
        before = int(await cluster.get(control.reference_version) or 0)
        await fund_quotas(budget.quota, quota_plans(snapshot, before + 1), now_ms)
        version = await publish_to_shards(cluster, budget.layout, snapshot)
        plans = [
            Plan(
                rule["campaign_id"],
                rule["category"],
                rule["budget_fen"],
                tranche_schedule(rule.get("tranches")),
                # The most one line of the rule can take: what a shard needs for one more sale.
                max(rule.get("cap_fen") or 0, rule.get("off_fen") or 0),
                version,
            )
            for rule in snapshot.rules
        ]
        # The gateways' keeper funds later tranches and rebalances from these (keeper.py).
        await record_plans(cluster, control, plans)
        await record_quota_plans(cluster, control, quota_plans(snapshot, version))
        now_ms = await cluster_time_ms(budget, budget.layout.control)
        for plan in plans:
            released = released_fen(plan.budget_fen, plan.tranches, now_ms)
            await budget.fund(plan.campaign_id, plan.category, released, plan.version)
            # A lowered budget takes the same part back from every shard, which leaves a shard
            # that had borrowed below what it has used while the others can still spend their
            # part: the rebalance brings it back up from them at once (as the keeper's next
            # pass would; docs/scale-out.md "Funding the shards").
            await budget.rebalance(plan.campaign_id, plan.category, low_water=max(plan.unit_fen, 1))
        for quota_plan in quota_plans(snapshot, version):
            await fund_quotas(budget.quota, [quota_plan], now_ms)
            await budget.quota.rebalance(quota_plan.campaign_id, quota_plan.category, low_water=1)
        return version
    finally:
        await budget.aclose()
        await cluster.aclose()


def quota_plans(snapshot: ReferenceSnapshot, version: int) -> list[QuotaPlan]:
    """The snapshot's qualification quotas, as the shards' claim script reads them
    (storage/redis/reference.py rule_json and pack_json): each rule with a quota (``q_quota``,
    ``q_tranches``) and each voucher pack (``pack:<id>``: ``q``, ``qt``, counted in packs)."""
    plans = [
        QuotaPlan(
            rule["campaign_id"],
            rule["category"],
            rule["qualification_quota"],
            tranche_schedule(rule.get("qualification_tranches"), "count"),
            version,
        )
        for rule in snapshot.rules
        if rule.get("qualification_quota")
    ]
    for campaign_id, packs in snapshot.packs.items():
        plans += [
            QuotaPlan(
                campaign_id,
                f"pack:{pack['pack_id']}",
                pack["quota"],
                tranche_schedule(pack.get("tranches") or [], "count"),
                version,
            )
            for pack in packs
        ]
    return plans


# The risk limits counted over every consumer's sales (a terminal's, a merchant's, the price
# flag's daily mix): no consumer shard sees them whole. The consumer's own hourly velocity and
# the per-merchant daily limit (a consumer's payments at one merchant, kept in the consumer's
# usage hash) are counted in the consumer's shard, exactly.
SHARED_RISK_LIMITS = (
    "terminal_sales_per_minute",
    "terminal_sales_per_hour",
    "merchant_sales_per_day",
    "price_flag_min_sales",
    "price_flag_ratio_percent",
)


def refuse_cross_shard_rules(campaigns: Sequence[Any], path: str = "campaigns") -> None:
    """On a cluster deployment each consumer shard counts its own sales, so a risk limit counted
    over every consumer's sales (SHARED_RISK_LIMITS: a terminal's or a merchant's velocity, the
    price flag) would allow up to S times its value (docs/scale-out.md 2.4: not built). Such a
    campaign is refused before anything is written, naming the field. The per-merchant daily
    limit and the consumer's hourly velocity are per consumer: served, exactly."""
    for index, campaign in enumerate(campaigns):
        values = campaign if isinstance(campaign, dict) else vars(campaign)
        limits = values.get("risk_limits")
        if isinstance(limits, str | bytes):
            limits = orjson.loads(limits)
        for name in SHARED_RISK_LIMITS:
            if int((limits or {}).get(name, 0)):
                raise ReferenceError(
                    f"{path}[{index}].risk_limits.{name}", "not enforced across consumer shards on a cluster yet"
                )


def read_reference(path: Path) -> ReferenceData:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ReferenceError("(file)", "must be a mapping with campaigns, products and merchants")
    return parse_reference(document)


def write_credentials(path: Path, credentials: dict[str, str], data: ReferenceData, target: str) -> None:
    """Credentials for demo clients and onboarding, by kind of caller, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = orjson.loads(path.read_bytes()) if path.exists() else {}
    kinds = {terminal.terminal_id: "terminals" for merchant in data.merchants for terminal in merchant.terminals}
    kinds.update({operator.operator_id: "operators" for operator in data.operators})
    kinds.update(
        {partner.partner_id: "partners" if partner.kind == "APP" else "providers" for partner in data.partners}
    )
    document: dict[str, Any] = {"target": target}
    for kind in ("terminals", "operators", "partners", "providers"):
        document[kind] = existing.get(kind, {})
        document[kind].update({caller: secret for caller, secret in credentials.items() if kinds.get(caller) == kind})
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))


async def load(config: Config, path: Path, credentials_out: Path | None) -> int:
    data = read_reference(path)
    if config.redis_shards:
        refuse_cross_shard_rules(data.campaigns)
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    try:
        await migrate(connection)
        credentials = await save_reference(connection, data)
        version = await publish_snapshot(config, await fetch_reference(connection))
    finally:
        await connection.close()
    if credentials_out is not None:
        write_credentials(credentials_out, credentials, data, config.listen)
    print(
        f"loaded {path}: {len(data.campaigns)} campaigns, {len(data.products)} products,"
        f" {len(data.merchants)} merchants, {len(data.operators)} operators, {len(data.partners)} partners;"
        f" reference version {version}",
        file=sys.stderr,
    )
    return version


async def publish(config: Config) -> int:
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    try:
        version = await publish_snapshot(config, await fetch_reference(connection))
    finally:
        await connection.close()
    print(f"published reference version {version}", file=sys.stderr)
    return version
