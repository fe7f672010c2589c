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
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from storage.postgres.audit import Difference, reconcile
from storage.postgres.qualifications import MirrorDifference, reconcile_qualifications
from storage.postgres.stream_consumer import StreamBacklog, consumer_backlogs
from storage.redis.cluster.streams import ShardStreamReader, StreamsLag
from storage.redis.keys import Keys
from storage.redis.store import SweepBacklog, sweep_backlog


@dataclass(frozen=True)
class CounterCheck:
    ledger_differences: list[Difference]
    mirror_differences: list[MirrorDifference]
    sweeper: SweepBacklog
    # "qualification_mirror" and "risk_events" (consumer_backlogs).
    streams: dict[str, StreamBacklog]
    # The shard streams (Redis Cluster): None when not asked; a str names why they could not be read.
    shard_streams: StreamsLag | str | None = None

    @property
    def dead_letters(self) -> int:
        shards = self.shard_streams.dead_letters if isinstance(self.shard_streams, StreamsLag) else 0
        return sum(stream.dead_letters for stream in self.streams.values()) + shards

    @property
    def mirror_behind(self) -> bool:
        """Qualification changes not yet mirrored: the qualification comparison is premature."""
        return self.streams["qualification_mirror"].backlog > 0

    @property
    def problem(self) -> bool:
        """A finding: a difference, work the sweepers have not done, a dead letter, or shard
        streams that could not be read. (A backlog alone is not one: the caller decides whether
        a premature comparison is.)"""
        unread = isinstance(self.shard_streams, str)
        return bool(
            self.ledger_differences or self.mirror_differences or self.sweeper.total or self.dead_letters or unread
        )


async def shard_streams_lag(reader: ShardStreamReader) -> StreamsLag | str:
    """The shard streams' lag, or the name of the error when the cluster cannot be read."""
    try:
        return await reader.lag()
    except (RedisError, RedisClusterException, OSError) as error:
        return type(error).__name__


async def check_counters(
    connection: asyncpg.Connection, redis: Redis, keys: Keys, shards: ShardStreamReader | None = None
) -> CounterCheck:
    """Every check; ``shards`` (the Redis Cluster's shard streams) only when given."""
    # The backlogs are read first: a backlog of 0 then means every change made before the
    # comparison started is in PostgreSQL.
    shard_streams = await shard_streams_lag(shards) if shards is not None else None
    streams = await consumer_backlogs(redis, keys)
    sweeper = await sweep_backlog(redis, keys)
    return CounterCheck(
        ledger_differences=await reconcile(connection, redis, keys),
        mirror_differences=await reconcile_qualifications(connection, redis, keys),
        sweeper=sweeper,
        streams=streams,
        shard_streams=shard_streams,
    )
