"""The ledger's tasks (``subsidyctl ledger writer|verify|reconcile|rebuild|lag|requeue-set-aside``,
server/ctl/ledger.py; ``python -m server.ledger`` is their alias).

- ``writer``: runs the ledger writer until SIGTERM/SIGINT, serving ``/metrics`` (Prometheus) and
  ``/health`` (JSON lag details) on SUBSIDY_WRITER_METRICS_LISTEN when set. The same process
  republishes reference changes whose publication failed after commit, and mirrors
  qualifications into PostgreSQL (storage/postgres/qualifications.py).
- ``verify``: recomputes the hash chains; a finding at the first break.
- ``reconcile``: Redis counters against the ledger, the qualification quota and holder hashes
  (voucher packs' included) against the qualification mirror, the sweepers' backlog (holds and
  qualifications overdue by more than a minute, or set aside because their expiry failed) and
  the stream consumers' (qualification mirror, risk events: unwritten, dead-lettered), and with
  SUBSIDY_REDIS_CLUSTER_NODES the shard streams' (docs/scale-out.md 2.3); a finding on any
  difference, sweeper backlog or dead letter, or shard streams that could not be read. With
  SUBSIDY_REDIS_SHARDS (``mode``: consumer shards) the money counters compared are the
  consumer shards' summed, the sweepers' backlog theirs (summed, and per shard where there is
  one), and each shard's ledger stream's backlog and dead letters are findings too
  (``streams.shard_ledgers``); so are the quota and holder hashes (summed over the shards)
  against the qualification mirror, and each shard's qualification and risk event streams'
  backlog and dead letters (``streams.shard_qualification_mirrors``, ``shard_risk_events``).
- ``rebuild``: restores Redis counters from the ledger, qualifications from their mirror and
  other providers' reports from theirs (after a Redis loss); refuses while either stream still
  holds unwritten entries unless ``--force``.
- ``lag``: the stream backlog, the qualification mirror's and the risk event writer's (entries
  not yet written and dead-lettered), with SUBSIDY_REDIS_CLUSTER_NODES the shard streams', with
  SUBSIDY_REDIS_SHARDS each consumer shard's ledger, qualification and risk event streams', and
  the sweepers' (overdue, set aside).
- ``requeue-set-aside``: puts set-aside holds and qualifications back on their schedule, due
  now, once the defect that made their expiry fail is fixed (an item failing again is set
  aside again).

Each returns (exit status, result as plain data); the command line prints it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from server.commands.common import EXIT_PROBLEM, EXIT_USAGE
from server.commands.exchange import Progress, reapply
from server.config import Config, cluster_nodes
from storage.postgres.audit import rebuild, verify
from storage.postgres.counter_check import (
    ConsumerShards,
    ShardLedgersLag,
    ShardStreamBacklogs,
    check_counters,
    shard_consumer_backlogs,
    shard_ledgers_lag,
    shard_streams_lag,
)
from storage.postgres.qualifications import restore_qualifications
from storage.postgres.stream_consumer import consumer_backlogs
from storage.postgres.writer import lag
from storage.redis.cluster.shards import ShardLayout
from storage.redis.cluster.streams import ShardStreamReader, StreamsLag
from storage.redis.keys import Keys
from storage.redis.store import requeue_set_aside, sweep_backlog

# The commands that need only Redis: they answer while PostgreSQL is away (when it matters).
REDIS_ONLY = frozenset({"lag", "requeue-set-aside"})
# A step of a long job: called with its description when the step starts, it returns the
# step's (done, total) progress callback.
Step = Callable[[str], Progress]


def _no_step(_description: str) -> Progress:
    return lambda _done, _total: None


def cluster_client(config: Config) -> RedisCluster:
    """A client of the Redis Cluster at SUBSIDY_REDIS_CLUSTER_NODES."""
    startup = [ClusterNode(host, port) for host, port in cluster_nodes(config.redis_cluster_nodes)]
    return RedisCluster(startup_nodes=startup, socket_timeout=10)


@contextlib.asynccontextmanager
async def shard_reader(config: Config) -> AsyncIterator[ShardStreamReader | None]:
    """A reader of the shard streams of the Redis Cluster at SUBSIDY_REDIS_CLUSTER_NODES (None
    when it is empty). Its lag() creates the writer's consumer group (from the streams' start)
    on a registered stream that has none yet, as the writer itself would: nothing is read."""
    if not config.redis_cluster_nodes:
        yield None
        return
    cluster = cluster_client(config)
    reader = ShardStreamReader(cluster, config.redis_prefix)
    try:
        yield reader
    finally:
        await reader.aclose()
        await cluster.aclose()


@contextlib.asynccontextmanager
async def consumer_shards(config: Config) -> AsyncIterator[ConsumerShards | None]:
    """The deployment's consumer shards (SUBSIDY_REDIS_SHARDS of SUBSIDY_REDIS_PREFIX on the
    cluster), None without them: their counters and streams are what a cluster deployment's
    sales change, the one-Redis keys never."""
    if not config.redis_shards:
        yield None
        return
    cluster = cluster_client(config)
    try:
        yield ConsumerShards(cluster, ShardLayout(config.redis_prefix, config.redis_shards))
    finally:
        await cluster.aclose()


def shard_ledgers_shown(lags: ShardLedgersLag) -> dict[str, Any]:
    """The consumer shards' ledger streams as shown: backlog and dead letters in all, then each
    shard's lag (as the writer's /health shows it), one row a shard (a table)."""
    return {
        "backlog": lags.backlog,
        "dead_letters": lags.dead_letters,
        "shards": [
            {"shard": name, "backlog": current.backlog, **dataclasses.asdict(current)}
            for name, current in lags.shards.items()
        ],
    }


# How reconcile and lag name each consumer shard's stream consumers (consumer_backlogs' names).
SHARD_CONSUMERS_SHOWN = {"qualification_mirror": "shard_qualification_mirrors", "risk_events": "shard_risk_events"}


def shard_consumers_shown(backlogs: dict[str, ShardStreamBacklogs]) -> dict[str, Any]:
    """The consumer shards' qualification mirrors' and risk event writers' streams as shown, each
    as ``shard_ledgers_shown``: backlog (not yet written) and dead letters in all, then one row a
    shard."""
    return {
        SHARD_CONSUMERS_SHOWN[name]: {
            "backlog": streams.backlog,
            "dead_letters": streams.dead_letters,
            "shards": [{"shard": shard, **dataclasses.asdict(current)} for shard, current in streams.shards.items()],
        }
        for name, streams in backlogs.items()
    }


def shard_streams_shown(shards: StreamsLag | str) -> dict[str, Any]:
    """The shard streams' lag as shown: streams, backlog, dead_letters; or the error."""
    return dataclasses.asdict(shards) if isinstance(shards, StreamsLag) else {"error": shards}


async def redis_lag(config: Config) -> dict[str, Any]:
    """The backlogs, from Redis alone: lag answers while PostgreSQL is away (when it matters)."""
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    keys = Keys(config.redis_prefix)
    try:
        current = await lag(redis, keys, "ledger-writer")
        ledger = {**dataclasses.asdict(current), "backlog": current.backlog}
        streams = await consumer_backlogs(redis, keys)
        qualifications, risk_events = streams["qualification_mirror"], streams["risk_events"]
        async with shard_reader(config) as reader:
            shards = {"shard_streams": shard_streams_shown(await shard_streams_lag(reader))} if reader else {}
        async with consumer_shards(config) as sharded:
            if sharded is not None:
                shards["shard_ledgers"] = shard_ledgers_shown(await shard_ledgers_lag(sharded))
                shards |= shard_consumers_shown(await shard_consumer_backlogs(sharded))
        return {
            **ledger,
            "qualification_backlog": qualifications.backlog,
            "qualification_dead_letters": qualifications.dead_letters,
            "risk_event_backlog": risk_events.backlog,
            "risk_event_dead_letters": risk_events.dead_letters,
            **shards,
            "sweeper": dataclasses.asdict(await sweep_backlog(redis, keys)),
        }
    finally:
        await redis.aclose()


async def with_connections(config: Config, action: str, force: bool, step: Step = _no_step) -> tuple[int, Any]:
    """One command of the ledger: (exit status, result). ``step`` reports a long one's progress."""
    if action == "lag":
        return 0, await redis_lag(config)
    if action == "requeue-set-aside":
        client = Redis.from_url(config.redis_url, socket_timeout=30)
        try:
            return 0, {"requeued": await requeue_set_aside(client, Keys(config.redis_prefix))}
        finally:
            await client.aclose()
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    keys = Keys(config.redis_prefix)
    try:
        connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    except BaseException:
        await redis.aclose()
        raise
    try:
        if action == "verify":
            report = await verify(connection)
            return (0 if report.ok else EXIT_PROBLEM), dataclasses.asdict(report)
        if action == "reconcile":
            # The same questions as ReportingService.Reconcile (storage/postgres/counter_check.py),
            # and the shard streams' (only here: the gateway holds no cluster connection).
            # Qualification differences carry "mirror" where the ledger's carry "ledger": claims
            # are compared with the qualification mirror, not the ledger.
            # With consumer shards, the money, quota and holder counters and the sweepers are
            # theirs, and their qualification and risk event streams' backlogs findings (check_counters).
            async with shard_reader(config) as reader, consumer_shards(config) as sharded:
                check = await check_counters(connection, redis, keys, reader, sharded)
            shards = {} if check.shard_streams is None else {"shard_streams": shard_streams_shown(check.shard_streams)}
            mode, shard_sweepers = {}, {}
            if check.shard_ledgers is not None:
                shards["shard_ledgers"] = shard_ledgers_shown(check.shard_ledgers)
                shards |= shard_consumers_shown(check.shard_consumers)
                mode = {"mode": "consumer shards", "shard_count": config.redis_shards}
                # Only the shards with work left, one row a shard: the sum is in "sweeper".
                shard_sweepers = {
                    "shard_sweepers": [
                        {"shard": name, **dataclasses.asdict(backlog)}
                        for name, backlog in check.shard_sweepers.items()
                        if backlog.total
                    ]
                }
            return (EXIT_PROBLEM if check.problem else 0), {
                **mode,
                "differences": [dataclasses.asdict(item) for item in check.ledger_differences]
                + [dataclasses.asdict(item) for item in check.mirror_differences],
                "sweeper": dataclasses.asdict(check.sweeper),
                **shard_sweepers,
                "streams": {name: dataclasses.asdict(stream) for name, stream in check.streams.items()} | shards,
            }
        current = await lag(redis, keys, "ledger-writer")
        # Dead-lettered snapshots count too: rebuilding from rows they should have updated would
        # restore stale states.
        mirror = (await consumer_backlogs(redis, keys))["qualification_mirror"]
        unmirrored = mirror.backlog + mirror.dead_letters
        if (current.backlog or current.dead_letters or unmirrored) and not force:
            problem = (
                f"{current.backlog} events are not yet written, {current.dead_letters} are dead-lettered"
                f" and {unmirrored} qualification changes are not yet mirrored"
            )
            return EXIT_USAGE, {"error": problem + "; drain the writer and resolve dead letters first, or use --force"}
        # Each restore is one atomic Redis transaction: its bar moves from 0 to done.
        money = step("money state from the ledger")
        money(0, 1)
        counters = await rebuild(connection, redis, keys)
        money(1, 1)
        mirrored = step("qualifications from their mirror")
        mirrored(0, 1)
        qualifications = await restore_qualifications(connection, redis, keys)
        mirrored(1, 1)
        # The rebuild drops every serial key; other providers' reports come back from their table.
        pool = await asyncpg.create_pool(config.pg_dsn, min_size=1, max_size=1)
        try:
            imported = await reapply(pool, redis, keys, step("other providers' records"))
        finally:
            await pool.close()
        return 0, {
            "budget_counters": len(counters.budget),
            "usage_counters": len(counters.usage),
            "serials": len(counters.serials),
            "qualifications": qualifications,
            "imported_consumers": imported.consumers,
            "imported_serials": imported.serials,
        }
    finally:
        await connection.close()
        await redis.aclose()
