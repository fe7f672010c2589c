"""``subsidyctl ledger reconcile`` and ``ledger lag`` on a cluster deployment with consumer shards
(SUBSIDY_REDIS_SHARDS, issue 16; server/commands/ledger.py, storage/postgres/counter_check.py)
on the real six-node local cluster: the ledger compared with the shards' counters summed, each
shard's ledger stream's backlog and dead letters a finding, and without SUBSIDY_REDIS_SHARDS the
one-Redis report as before. Sales, funding and draining as in test_cluster_shard_ledger.py.
Qualifications too: claims (by category and of a voucher pack), cancels and a blocked claimant's
decline through ShardedStore.claim in each claimant's shard, against quotas funded per shard
(shard_budget.py ShardQuota), mirrored and written by the writer's own per-shard consumers
(server/processes/writer.py shard_consumers_of); the quota and holder hashes compared with the
mirror's rows, and each shard's qualification and risk event streams' backlog and dead letters."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from redis.asyncio.cluster import RedisCluster

from server.commands.common import EXIT_PROBLEM
from server.commands.ledger import with_connections
from server.config import Config
from server.processes.writer import ShardLedgers, shard_consumers_of
from storage.cluster_dev import LocalCluster
from storage.devenv import Services
from storage.postgres.reference import ReferenceSnapshot
from storage.redis.cluster.shard_budget import ShardBudget
from storage.redis.cluster.shards import ShardLayout, publish_to_shards
from storage.redis.contract import CLAIM_DECLINE_REASONS, ClaimDeclined, Failure, Issued, VoucherArgs
from storage.redis.keys import Keys
from tests.integration import cluster_fixtures, shard_load
from tests.integration import test_cluster_shard_ledger as shard_ledger
from tests.integration.shard_load import CAMPAIGN, CATEGORY
from tests.integration.test_cluster_qualification_mirror import cancel, claim, claim_snapshot, consumers_of
from tests.integration.test_cluster_shard_ledger import sell, shard_writer
from tests.integration.test_cluster_shards import new_prefix

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client
ledger_dsn = shard_ledger.ledger_dsn  # a migrated database of the test's own
RESERVED = f"{CAMPAIGN}:{shard_load.CATEGORY}:reserved"
PACK, PACK_CATEGORY = "duo", "tv"
QUOTA, PACK_QUOTA = 600, 60  # 100 vouchers and 10 packs a shard of 6


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


def qualification_snapshot() -> ReferenceSnapshot:
    """The shard tests' campaign issuing qualifications (test_cluster_qualification_mirror.py's),
    plus a ``tv`` rule claimed only in the voucher pack ``duo`` (one voucher)."""
    base = claim_snapshot()
    rules = [*base.rules, {**base.rules[0], "category": PACK_CATEGORY}]
    pack = {
        "pack_id": PACK,
        "vouchers": [{"category": PACK_CATEGORY, "threshold_fen": 1_000, "off_fen": 100}],
        "quota": PACK_QUOTA,
        "tranches": [],
    }
    return dataclasses.replace(base, rules=rules, packs={CAMPAIGN: [pack]})


async def claim_in_shards(client: RedisCluster, layout: ShardLayout, per_shard: int = 3) -> dict[str, int]:
    """The campaign published and its quotas funded over the shards (``<category>:funded``,
    ``:total`` and ``:funded_version`` in each shard's quota hash, ``pack:duo:`` ones too); then
    per shard, ``per_shard`` claimants through ShardedStore.claim (codes naming their shard), in
    turn claiming a fridge, claiming the pack, claiming a fridge and cancelling it; and one
    claimant more, blocked in their shard, declined CONSUMER_BLOCKED (a risk event there).
    Returns each issued code's shard."""
    await publish_to_shards(client, layout, qualification_snapshot())
    budget = ShardBudget(client, layout)
    try:
        await budget.quota.fund(CAMPAIGN, CATEGORY, QUOTA)
        await budget.quota.fund(CAMPAIGN, f"pack:{PACK}", PACK_QUOTA)
    finally:
        await budget.aclose()
    store = await shard_load.sharded_store(client, layout, serials=False)
    issued: dict[str, int] = {}

    async def claimant(turn: int, consumer: str) -> None:
        code = store.new_redemption_code(consumer)
        request = dataclasses.replace(claim(consumer), redemption_code=code)
        if turn % 3 == 1:
            voucher = VoucherArgs(store.new_redemption_code(consumer), "", "")
            request = dataclasses.replace(request, category="", pack_id=PACK, vouchers=[voucher])
            code = voucher.code
        reply = await store.claim(request)
        assert not isinstance(reply, Failure) and isinstance(reply.body, Issued), reply
        issued[code] = layout.shard_of_consumer(consumer)
        if turn % 3 == 2:
            cancelled = await store.cancel_qualification(cancel(code))
            assert not isinstance(cancelled, Failure), cancelled

    await asyncio.gather(*(claimant(turn, consumer) for turn, consumer in enumerate(consumers_of(layout, per_shard))))
    for consumer in consumers_of(layout, 1):
        keys = layout.keys[layout.shard_of_consumer(consumer)]
        await client.hset(keys.blocks, f"CONSUMER:{consumer}", "0")  # type: ignore[misc]  # blocked for good
        request = dataclasses.replace(claim(consumer), redemption_code=store.new_redemption_code(consumer))
        reply = await store.claim(request)
        assert not isinstance(reply, Failure) and isinstance(reply.body, ClaimDeclined), reply
        assert reply.body.reason == CLAIM_DECLINE_REASONS["CONSUMER_BLOCKED"]
    return issued


async def mirror(config: Config, client: RedisCluster, shards: list[Keys], *, risk_events: bool = True) -> None:
    """The writer's own per-shard qualification mirrors (and risk event writers, unless not
    ``risk_events``) of ``shards`` (shard_consumers_of with the deployment's settings) run until
    their streams are empty, then stopped."""
    names = {keys.shard for keys in shards}
    kinds = {"qualification_mirror", "risk_events"} if risk_events else {"qualification_mirror"}
    consumers = [
        consumer
        for kind, consumer in shard_consumers_of(config, ShardLedgers(client, [])).consumers
        if kind in kinds and consumer.keys.shard in names
    ]
    stopping = asyncio.Event()
    running = [asyncio.create_task(consumer.run(stopping)) for consumer in consumers]
    try:
        for _ in range(300):
            if sum([await client.xlen(consumer.stream) for consumer in consumers]) == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the shards' qualification and risk event streams not drained in 30 s")
    finally:
        stopping.set()
        await asyncio.gather(*running)


async def reconciled(config: Config) -> tuple[int, dict[str, Any]]:
    return await with_connections(config, "reconcile", force=False)


async def assert_clean(config: Config) -> None:
    status, result = await reconciled(config)
    assert (status, result["differences"]) == (0, []), result


def backlogs(result: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each shard's (backlog, dead letters) as reconcile or lag shows them."""
    return {shard["shard"]: (shard["backlog"], shard["dead_letters"]) for shard in result["shard_ledgers"]["shards"]}


def consumer_backlogs(result: dict[str, Any], name: str) -> dict[str, tuple[int, int]]:
    """Each shard's (backlog, dead letters) of its ``name`` consumer's stream (shard_qualification_mirrors,
    shard_risk_events) as reconcile (under ``streams``) or lag shows them."""
    return {shard["shard"]: (shard["backlog"], shard["dead_letters"]) for shard in result[name]["shards"]}


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


async def test_a_drained_deployment_with_sales_and_qualifications_reconciles_clean(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """Sales, then claims by category and of a pack and cancels on 6 shards against funded quota
    slices, a blocked claimant's decline in each shard; every shard's ledger, qualification and
    risk event streams drained by the writer's consumers. reconcile: exit 0, no difference
    (though each shard's quota hash holds its ``:funded``, ``:total`` and ``:funded_version``),
    and lag: every shard's qualification mirror and risk event writer at backlog 0, no dead
    letter. Fails before: the one-Redis quota and holder hashes, which these claims never
    touched, were compared with the mirror's rows, and the shard streams were not shown."""
    layout = ShardLayout(new_prefix(), 6)
    await sell(cluster_client, layout)
    issued = await claim_in_shards(cluster_client, layout)
    assert sorted(set(issued.values())) == list(range(6))
    config = deployment(services, redis_cluster, ledger_dsn, layout)
    await drain(ledger_dsn, cluster_client, list(layout.keys))
    await mirror(config, cluster_client, list(layout.keys))
    quota = await cluster_client.hgetall(layout.keys[0].qualification_quota(CAMPAIGN))
    for field in (f"{CATEGORY}:funded", f"{CATEGORY}:total", f"pack:{PACK}:total", f"{CATEGORY}:claimed"):
        assert field.encode() in quota, quota

    status, result = await reconciled(config)
    assert (status, result["differences"]) == (0, []), result
    clean = {keys.shard: (0, 0) for keys in layout.keys}
    for name in ("shard_qualification_mirrors", "shard_risk_events"):
        assert consumer_backlogs(result["streams"], name) == clean
        assert (result["streams"][name]["backlog"], result["streams"][name]["dead_letters"]) == (0, 0)
    lag_status, lagging = await with_connections(config, "lag", force=False)
    assert lag_status == 0
    for name in ("shard_qualification_mirrors", "shard_risk_events"):
        assert consumer_backlogs(lagging, name) == clean


async def test_a_quota_claimed_count_changed_by_hand_in_one_shard_is_a_qualification_finding(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """Claims on 3 shards, mirrored: clean. HINCRBY 3 on one shard's ``fridge:claimed``: exit 1
    with exactly that difference, kind ``qualification``, named by campaign and category, the
    shards' sum 3 above the mirror's count; and HINCRBY 1 on another shard's ``pack:duo:claimed``
    a ``voucher_pack`` one. Put back, exit 0."""
    layout = ShardLayout(new_prefix(), 3)
    await claim_in_shards(cluster_client, layout, per_shard=6)
    config = deployment(services, redis_cluster, ledger_dsn, layout)
    await mirror(config, cluster_client, list(layout.keys))
    await assert_clean(config)
    quota, pack_quota = layout.keys[1].qualification_quota(CAMPAIGN), layout.keys[2].qualification_quota(CAMPAIGN)
    await cluster_client.hincrby(quota, f"{CATEGORY}:claimed", 3)  # type: ignore[misc]
    try:
        status, result = await reconciled(config)
        assert status == EXIT_PROBLEM
        [difference] = result["differences"]
        assert (difference["kind"], difference["key"]) == ("qualification", f"quota:{CAMPAIGN}:{CATEGORY}:claimed")
        # 6 claimants a shard, every third claiming the pack, every third cancelling: 2 held a shard.
        assert (difference["mirror"], difference["redis"]) == (6, 9)
        await cluster_client.hincrby(pack_quota, f"pack:{PACK}:claimed", 1)  # type: ignore[misc]
        try:
            status, result = await reconciled(config)
            assert status == EXIT_PROBLEM
            assert [(item["kind"], item["key"], item["redis"] - item["mirror"]) for item in result["differences"]] == [
                ("qualification", f"quota:{CAMPAIGN}:{CATEGORY}:claimed", 3),
                ("voucher_pack", f"quota:{CAMPAIGN}:pack:{PACK}:claimed", 1),
            ]
        finally:
            await cluster_client.hincrby(pack_quota, f"pack:{PACK}:claimed", -1)  # type: ignore[misc]
    finally:
        await cluster_client.hincrby(quota, f"{CATEGORY}:claimed", -3)  # type: ignore[misc]
    await assert_clean(config)


async def test_an_undrained_qualification_stream_and_a_dead_letter_are_findings_per_shard(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """Claims on 6 shards; every shard's qualification mirror drained but one's, and every risk
    event writer but that shard's: exit 1, that shard's qualification backlog is every entry of
    its stream and its risk event backlog its one decline, the others' 0; lag says the same.
    Drained, exit 0; an entry in another shard's ``risk_events:dead``: its dead letter, exit 1."""
    layout = ShardLayout(new_prefix(), 6)
    await claim_in_shards(cluster_client, layout)
    config = deployment(services, redis_cluster, ledger_dsn, layout)
    undrained = layout.keys[3]
    await mirror(config, cluster_client, [keys for keys in layout.keys if keys != undrained])
    waiting = await cluster_client.xlen(undrained.qualification_events)
    assert waiting > 0 and await cluster_client.xlen(undrained.risk_events) == 1
    clean = {keys.shard: (0, 0) for keys in layout.keys}
    status, result = await reconciled(config)
    assert status == EXIT_PROBLEM
    assert consumer_backlogs(result["streams"], "shard_qualification_mirrors") == clean | {
        undrained.shard: (waiting, 0)
    }
    assert consumer_backlogs(result["streams"], "shard_risk_events") == clean | {undrained.shard: (1, 0)}
    assert result["streams"]["shard_qualification_mirrors"]["backlog"] == waiting
    assert backlogs(result["streams"]) == clean  # the shard ledgers: nothing sold
    _, lagging = await with_connections(config, "lag", force=False)
    assert consumer_backlogs(lagging, "shard_qualification_mirrors") == clean | {undrained.shard: (waiting, 0)}
    assert consumer_backlogs(lagging, "shard_risk_events") == clean | {undrained.shard: (1, 0)}

    await mirror(config, cluster_client, [undrained])
    await assert_clean(config)
    dead = layout.keys[5].risk_events + ":dead"
    entry = await cluster_client.xadd(dead, {"id": "1-1", "r": "{}"})
    try:
        status, result = await reconciled(config)
        assert (status, result["differences"]) == (EXIT_PROBLEM, [])
        assert consumer_backlogs(result["streams"], "shard_risk_events") == clean | {layout.keys[5].shard: (0, 1)}
        assert result["streams"]["shard_risk_events"]["dead_letters"] == 1
    finally:
        await cluster_client.xdel(dead, entry)
    assert (await reconciled(config))[0] == 0
