"""Every question ``reconcile`` asks, in one place: ``subsidyctl ledger reconcile`` (reading the
databases directly) and ``ReportingService.Reconcile`` (the gateway answering an operator who
has neither) both call ``check_counters``, so the two cannot drift apart.

- Redis's money counters against the ledger (audit.py): budget, usage, serials.
- Redis's qualification quota and holder counters (voucher packs' included) against the
  qualification mirror (qualifications.py): claims are not money, so not in the ledger.
- The sweepers' backlog: a hold past its expiry still reserves budget, quota and serials the
  ledger will release.
- The stream consumers' backlog and dead letters: a dead-lettered entry is a row missing from
  PostgreSQL (a qualification's newer state, a risk event); an unwritten qualification change
  makes the qualification comparison premature (drain first).
- With Redis Cluster (SUBSIDY_REDIS_CLUSTER_NODES, docs/scale-out.md 2.3), the shard streams'
  backlog and dead letters (storage/redis/cluster/streams.py): a dead letter is a shard event
  missing from PostgreSQL, and a cluster that cannot be read hides them, so both are findings.
  Only the command line reads them: the gateway holds no cluster connection, and
  ReconcileResponse has no field for them.
- With consumer shards (SUBSIDY_REDIS_SHARDS, docs/scale-out.md 2.0), the money counters are the
  shards' summed (a cluster deployment's sales never touch the one-Redis keys), each shard's
  ``ledger`` stream's backlog and dead letters, and each shard's sweeper backlog. A shard
  ledger backlog is a finding, unlike the one-Redis streams': the shards' counters are then
  ahead of the ledger, and the differences that makes cannot be told from a wrong counter
  (drain, then reconcile again). Command line only, as the shard streams.
- With consumer shards too, the qualification quota and holder hashes compared with the mirror
  are the shards' (each quota's counts summed over the shards, each person's holder hash in
  their shard; a shard quota's own ``:funded``, ``:total`` and ``:funded_version`` left out), and
  each shard's ``qualification_events`` and ``risk_events`` streams' backlog and dead letters
  (the streams the writer's per-shard QualificationMirror and ShardRiskEventWriter drain,
  server/processes/writer.py ``shard_consumers_of``) are findings, as its ledger stream's: an
  unwritten qualification change makes that shard's holders and quota counts run ahead of the
  mirror, a dead letter is a row missing from PostgreSQL.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from storage.postgres.audit import Counters, Difference, compare, ledger_counters, reconcile, redis_counters
from storage.postgres.qualifications import (
    CounterKey,
    MirrorDifference,
    held_counters,
    mirror_differences,
    mirrored_counters,
    reconcile_qualifications,
)
from storage.postgres.stream_consumer import StreamBacklog, consumer_backlogs
from storage.postgres.writer import Lag, WriterConfig, lag
from storage.redis.cluster.shards import ShardLayout
from storage.redis.cluster.streams import ShardStreamReader, StreamsLag
from storage.redis.keys import Keys
from storage.redis.store import SweepBacklog, sweep_backlog

# The shard budget's own fields (storage/redis/cluster/shard_budget.py: the funding target
# applied to the shard and the plan version it came from), not money the ledger moves.
SHARD_BUDGET_FIELDS = frozenset({"funded", "funded_version"})
# The shard quota's own fields (shard_budget.py ShardQuota: the shard's slice of the quota, the
# funding target applied and its plan version), not claims: the mirror's rows make none of them.
SHARD_QUOTA_FIELDS = frozenset({"funded", "total", "funded_version"})
# The ledger writer's consumer group on every ledger stream, a shard's too.
LEDGER_GROUP = WriterConfig.group


@dataclass(frozen=True)
class ConsumerShards:
    """A cluster deployment's consumer shards: the client that routes to each shard's primary."""

    cluster: RedisCluster
    layout: ShardLayout


@dataclass(frozen=True)
class ShardLedgersLag:
    """Each consumer shard's ``ledger`` stream behind the ledger, by shard name."""

    shards: dict[str, Lag]

    @property
    def backlog(self) -> int:
        return sum(current.backlog for current in self.shards.values())

    @property
    def dead_letters(self) -> int:
        return sum(current.dead_letters for current in self.shards.values())


@dataclass(frozen=True)
class ShardStreamBacklogs:
    """One stream consumer's stream in every consumer shard (the qualification mirror's
    ``qualification_events`` or the risk event writer's ``risk_events``), by shard name."""

    shards: dict[str, StreamBacklog]

    @property
    def backlog(self) -> int:
        return sum(current.backlog for current in self.shards.values())

    @property
    def dead_letters(self) -> int:
        return sum(current.dead_letters for current in self.shards.values())


@dataclass(frozen=True)
class CounterCheck:
    ledger_differences: list[Difference]
    mirror_differences: list[MirrorDifference]
    sweeper: SweepBacklog
    # "qualification_mirror" and "risk_events" (consumer_backlogs).
    streams: dict[str, StreamBacklog]
    # The shard streams (Redis Cluster): None when not asked; a str names why they could not be read.
    shard_streams: StreamsLag | str | None = None
    # With consumer shards: their ledger streams' lag, and each shard's sweeper backlog (summed
    # in ``sweeper``). None and empty on one Redis.
    shard_ledgers: ShardLedgersLag | None = None
    shard_sweepers: dict[str, SweepBacklog] = field(default_factory=dict)
    # With consumer shards: their "qualification_mirror" and "risk_events" streams (as
    # consumer_backlogs names them), by shard. Empty on one Redis.
    shard_consumers: dict[str, ShardStreamBacklogs] = field(default_factory=dict)

    @property
    def dead_letters(self) -> int:
        shards = self.shard_streams.dead_letters if isinstance(self.shard_streams, StreamsLag) else 0
        ledgers = self.shard_ledgers.dead_letters if self.shard_ledgers is not None else 0
        consumers = sum(stream.dead_letters for stream in self.shard_consumers.values())
        return sum(stream.dead_letters for stream in self.streams.values()) + shards + ledgers + consumers

    @property
    def mirror_behind(self) -> bool:
        """Qualification changes not yet mirrored: the qualification comparison is premature."""
        sharded = self.shard_consumers.get("qualification_mirror")
        return self.streams["qualification_mirror"].backlog > 0 or (sharded is not None and sharded.backlog > 0)

    @property
    def problem(self) -> bool:
        """A finding: a difference, work the sweepers have not done, a dead letter, shard
        streams that could not be read, or a consumer shard's unwritten ledger events,
        qualification changes or risk events. (A one-Redis stream's backlog alone is not one:
        the caller decides whether a premature comparison is.)"""
        unread = isinstance(self.shard_streams, str)
        unwritten = self.shard_ledgers is not None and self.shard_ledgers.backlog > 0
        unwritten = unwritten or any(stream.backlog for stream in self.shard_consumers.values())
        return bool(
            self.ledger_differences
            or self.mirror_differences
            or self.sweeper.total
            or self.dead_letters
            or unread
            or unwritten
        )


async def shard_streams_lag(reader: ShardStreamReader) -> StreamsLag | str:
    """The shard streams' lag, or the name of the error when the cluster cannot be read."""
    try:
        return await reader.lag()
    except (RedisError, RedisClusterException, OSError) as error:
        return type(error).__name__


async def shard_ledgers_lag(shards: ConsumerShards) -> ShardLedgersLag:
    """Each consumer shard's ledger stream's lag, as the ledger writer's /health reads it."""
    return ShardLedgersLag({keys.shard: await lag(shards.cluster, keys, LEDGER_GROUP) for keys in shards.layout.keys})


async def shard_consumer_backlogs(shards: ConsumerShards) -> dict[str, ShardStreamBacklogs]:
    """Each consumer shard's qualification and risk event streams' backlog and dead letters, read
    as one Redis's (``consumer_backlogs`` on the shard's keys: the streams the writer's per-shard
    mirror and risk event writer drain, entries deleted once written): by stream, then shard."""
    by_shard = {
        # consumer_backlogs names only this shard's keys (one slot): the cluster client routes them.
        keys.shard: await consumer_backlogs(shards.cluster, keys)  # type: ignore[arg-type]
        for keys in shards.layout.keys
    }
    return {
        name: ShardStreamBacklogs({shard: streams[name] for shard, streams in by_shard.items()})
        for name in ("qualification_mirror", "risk_events")
    }


async def shard_qualification_counters(shards: ConsumerShards) -> Counter[CounterKey]:
    """The shards' quota and holder hashes as one Redis's: each campaign's quota counts summed
    over the shards (each claims against its slice), its own fields left out; each person's
    holder hash as their shard holds it (they live in one shard, so the sum is theirs)."""
    summed: Counter[CounterKey] = Counter()
    for keys in shards.layout.keys:
        # held_counters names only this shard's keys (one slot): the cluster client routes them.
        for key, value in (await held_counters(shards.cluster, keys)).items():  # type: ignore[arg-type]
            _, consumer_key, name = key
            if consumer_key or name.rsplit(":", 1)[-1] not in SHARD_QUOTA_FIELDS:
                summed[key] += value
    return summed


async def shard_counters(shards: ConsumerShards) -> Counters:
    """The shards' money counters summed: budget fields per campaign category (each shard holds
    a slice), usage and serials (each consumer lives in one shard, so these only add up)."""
    summed = Counters()
    for keys in shards.layout.keys:
        # redis_counters names only this shard's keys (one slot): the cluster client routes them.
        shard = await redis_counters(shards.cluster, keys)  # type: ignore[arg-type]
        for key, value in shard.budget.items():
            if key[2] not in SHARD_BUDGET_FIELDS:
                summed.budget[key] = summed.budget.get(key, 0) + value
        for key, units in shard.usage.items():
            summed.usage[key] = summed.usage.get(key, 0) + units
        summed.serials.update(shard.serials)
    return summed


async def check_counters(
    connection: asyncpg.Connection,
    redis: Redis,
    keys: Keys,
    shards: ShardStreamReader | None = None,
    consumer_shards: ConsumerShards | None = None,
) -> CounterCheck:
    """Every check; ``shards`` (the Redis Cluster's shard streams) only when given; with
    ``consumer_shards`` the money, quota and holder counters and the sweepers are theirs instead
    of ``keys``', and their qualification and risk event streams are read too."""
    # The backlogs are read first: a backlog of 0 then means every change made before the
    # comparison started is in PostgreSQL.
    shard_streams = await shard_streams_lag(shards) if shards is not None else None
    shard_ledgers = await shard_ledgers_lag(consumer_shards) if consumer_shards is not None else None
    shard_consumers = await shard_consumer_backlogs(consumer_shards) if consumer_shards is not None else {}
    streams = await consumer_backlogs(redis, keys)
    if consumer_shards is None:
        sweeper, shard_sweepers = await sweep_backlog(redis, keys), {}
        ledger_differences = await reconcile(connection, redis, keys)
        qualification_differences = await reconcile_qualifications(connection, redis, keys)
    else:
        shard_sweepers = {
            shard.shard: await sweep_backlog(consumer_shards.cluster, shard)  # type: ignore[arg-type]
            for shard in consumer_shards.layout.keys
        }
        sweeper = summed_sweepers(list(shard_sweepers.values()))
        ledger_differences = compare(await ledger_counters(connection), await shard_counters(consumer_shards))
        qualification_differences = mirror_differences(
            await mirrored_counters(connection), await shard_qualification_counters(consumer_shards)
        )
    return CounterCheck(
        ledger_differences=ledger_differences,
        mirror_differences=qualification_differences,
        sweeper=sweeper,
        streams=streams,
        shard_streams=shard_streams,
        shard_ledgers=shard_ledgers,
        shard_sweepers=shard_sweepers,
        shard_consumers=shard_consumers,
    )


def summed_sweepers(backlogs: list[SweepBacklog]) -> SweepBacklog:
    return SweepBacklog(
        sum(item.overdue_holds for item in backlogs),
        sum(item.overdue_qualifications for item in backlogs),
        sum(item.set_aside_holds for item in backlogs),
        sum(item.set_aside_qualifications for item in backlogs),
    )
