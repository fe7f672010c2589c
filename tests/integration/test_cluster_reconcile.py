"""``subsidyctl ledger reconcile`` and ``ledger lag`` on a cluster deployment with consumer shards
(SUBSIDY_REDIS_SHARDS, issue 16; server/commands/ledger.py, storage/postgres/counter_check.py)
on the real six-node local cluster: the ledger compared with the shards' counters summed, each
shard's ledger stream's backlog and dead letters a finding, and without SUBSIDY_REDIS_SHARDS the
one-Redis report as before. Sales, funding and draining as in test_cluster_shard_ledger.py."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.cluster import RedisCluster

from server.commands.common import EXIT_PROBLEM
from server.commands.ledger import with_connections
from server.config import Config
from storage.cluster_dev import LocalCluster
from storage.devenv import Services
from storage.redis.cluster.shards import ShardLayout
from storage.redis.keys import Keys
from tests.integration import cluster_fixtures, shard_load
from tests.integration import test_cluster_shard_ledger as shard_ledger
from tests.integration.shard_load import CAMPAIGN
from tests.integration.test_cluster_shard_ledger import sell, shard_writer
from tests.integration.test_cluster_shards import new_prefix

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client
ledger_dsn = shard_ledger.ledger_dsn  # a migrated database of the test's own
RESERVED = f"{CAMPAIGN}:{shard_load.CATEGORY}:reserved"


def deployment(
    services: Services, redis_cluster: LocalCluster, dsn: str, layout: ShardLayout, *, shards: bool = True
) -> Config:
    """The commands' configuration: the cluster deployment's (``shards``), or the same prefix
    and databases as one Redis (no SUBSIDY_REDIS_CLUSTER_NODES, no SUBSIDY_REDIS_SHARDS)."""
    nodes = ",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes)
    cluster = {"redis_cluster_nodes": nodes, "redis_shards": layout.count} if shards else {}
    return Config(pg_dsn=dsn, redis_url=services.redis_url, redis_prefix=layout.prefix, log_level="WARNING", **cluster)


async def drain(dsn: str, client: RedisCluster, shards: list[Keys]) -> None:
    """Each of ``shards``' ledger streams drained into the ledger by its own LedgerWriter."""
    writers = [shard_writer(dsn, client, keys) for keys in shards]
    try:
        await asyncio.gather(*(writer.drain() for writer in writers))
    finally:
        await asyncio.gather(*(writer.close() for writer in writers))


async def reconciled(config: Config) -> tuple[int, dict[str, Any]]:
    return await with_connections(config, "reconcile", force=False)


def backlogs(result: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each shard's (backlog, dead letters) as reconcile or lag shows them."""
    return {shard["shard"]: (shard["backlog"], shard["dead_letters"]) for shard in result["shard_ledgers"]["shards"]}


async def test_drained_shards_reconcile_and_a_bare_stream_entry_is_a_backlog_finding(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """Sales on 6 shards, every shard drained: reconcile in consumer-shards mode, no difference
    (the summed shard counters equal the ledger's, with reserved, spent and refunded all > 0),
    no backlog, exit 0; lag shows each shard's backlog 0. An entry added to one shard's stream
    (no counter moved) is that shard's backlog of 1: exit 1 with still no difference; removed,
    exit 0 again. A hold overdue in that shard: the sweeper's finding, named by shard."""
    layout = ShardLayout(new_prefix(), 6)
    await sell(cluster_client, layout)
    await drain(ledger_dsn, cluster_client, list(layout.keys))
    config = deployment(services, redis_cluster, ledger_dsn, layout)
    status, result = await reconciled(config)
    assert (status, result["differences"]) == (0, []), result
    assert (result["mode"], result["shard_count"]) == ("consumer shards", 6)
    clean = {keys.shard: (0, 0) for keys in layout.keys}
    assert backlogs(result["streams"]) == clean
    assert result["sweeper"] == {
        "overdue_holds": 0,
        "overdue_qualifications": 0,
        "set_aside_holds": 0,
        "set_aside_qualifications": 0,
    }
    assert result["shard_sweepers"] == []
    lag_status, lagging = await with_connections(config, "lag", force=False)
    assert lag_status == 0 and backlogs(lagging) == clean
    assert (lagging["shard_ledgers"]["backlog"], lagging["shard_ledgers"]["dead_letters"]) == (0, 0)

    shard = layout.keys[4]
    entry = await cluster_client.xadd(shard.ledger, {"e": "{}"})
    try:
        status, result = await reconciled(config)
        assert (status, result["differences"]) == (EXIT_PROBLEM, []), result
        assert backlogs(result["streams"]) == clean | {shard.shard: (1, 0)}
        assert result["streams"]["shard_ledgers"]["backlog"] == 1
        _, lagging = await with_connections(config, "lag", force=False)
        assert backlogs(lagging) == clean | {shard.shard: (1, 0)}
    finally:
        await cluster_client.xdel(shard.ledger, entry)
    assert (await reconciled(config))[0] == 0

    await cluster_client.zadd(shard.holds, {"a-hold-nobody-expired": 1})  # due since 1970
    try:
        status, result = await reconciled(config)
        assert (status, result["differences"], result["sweeper"]["overdue_holds"]) == (EXIT_PROBLEM, [], 1)
        assert [(item["shard"], item["overdue_holds"]) for item in result["shard_sweepers"]] == [(shard.shard, 1)]
    finally:
        await cluster_client.zrem(shard.holds, "a-hold-nobody-expired")


async def test_a_counter_changed_by_hand_in_one_shard_is_a_difference(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """HINCRBY 137 on one shard's ``reserved``: exit 1 with exactly that difference, named by
    campaign and category, the shards' sum 137 fen above the ledger's; put back, exit 0."""
    layout = ShardLayout(new_prefix(), 3)
    await sell(cluster_client, layout)
    await drain(ledger_dsn, cluster_client, list(layout.keys))
    config = deployment(services, redis_cluster, ledger_dsn, layout)
    status, result = await reconciled(config)
    assert (status, result["differences"]) == (0, [])
    budget = layout.keys[1].budget(CAMPAIGN)
    field = f"{shard_load.CATEGORY}:reserved"
    await cluster_client.hincrby(budget, field, 137)  # type: ignore[misc]
    try:
        status, result = await reconciled(config)
        assert status == EXIT_PROBLEM
        [difference] = result["differences"]
        assert difference["kind"] == "budget" and difference["key"] == RESERVED
        assert difference["redis"] - difference["ledger"] == 137
    finally:
        await cluster_client.hincrby(budget, field, -137)  # type: ignore[misc]
    assert (await reconciled(config))[0] == 0


async def test_an_undrained_shard_is_a_backlog_finding(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """Every shard drained but one: exit 1, that shard's backlog is every entry of its stream,
    the others' 0, and lag says the same."""
    layout = ShardLayout(new_prefix(), 6)
    await sell(cluster_client, layout)
    undrained = layout.keys[2]
    await drain(ledger_dsn, cluster_client, [keys for keys in layout.keys if keys != undrained])
    waiting = await cluster_client.xlen(undrained.ledger)
    assert waiting > 0
    expected = {keys.shard: (0, 0) for keys in layout.keys} | {undrained.shard: (waiting, 0)}
    config = deployment(services, redis_cluster, ledger_dsn, layout)
    status, result = await reconciled(config)
    assert status == EXIT_PROBLEM
    assert backlogs(result["streams"]) == expected
    assert result["streams"]["shard_ledgers"]["backlog"] == waiting
    _, lagging = await with_connections(config, "lag", force=False)
    assert backlogs(lagging) == expected
    await drain(ledger_dsn, cluster_client, [undrained])
    assert (await reconciled(config))[0] == 0


async def test_without_shards_reconcile_and_lag_are_one_redis_ones(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """The same prefix and ledger without SUBSIDY_REDIS_CLUSTER_NODES and SUBSIDY_REDIS_SHARDS:
    today's report (no mode, no shard fields) comparing the one-Redis keys, which these sales
    never touched: the ledger's reserved against 0 in Redis."""
    layout = ShardLayout(new_prefix(), 2)
    await sell(cluster_client, layout)
    await drain(ledger_dsn, cluster_client, list(layout.keys))
    one_redis = deployment(services, redis_cluster, ledger_dsn, layout, shards=False)
    status, result = await reconciled(one_redis)
    assert status == EXIT_PROBLEM
    assert list(result) == ["differences", "sweeper", "streams"]
    assert set(result["streams"]) == {"qualification_mirror", "risk_events"}
    [reserved] = [item for item in result["differences"] if item["key"] == RESERVED]
    assert reserved["ledger"] > 0 and reserved["redis"] == 0
    _, lagging = await with_connections(one_redis, "lag", force=False)
    assert "shard_ledgers" not in lagging and "mode" not in lagging
