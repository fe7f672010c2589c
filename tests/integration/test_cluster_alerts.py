"""The ledger writer process's budget alert check on a Redis Cluster deployment (issue 16,
server/processes/alert_watch.py with SUBSIDY_REDIS_SHARDS): a campaign's budget is counted in every
consumer shard's key set, none of it in one Redis's keys, so the check reads the shards' counts
summed (ShardedBudgetReader over the writer's cluster client). Sales through a cluster gateway
nobody watches (no WatchFunds stream: its poller never runs), one consumer's sale in each of the
six shards of a real local cluster, so no shard's counts alone reach a threshold that their sum
crosses: the crossing is recorded once in PostgreSQL by the writer, as on one Redis; a shard whose
primary does not answer fails a check, logged, and the next check records it."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from subsidy_client import AuthorizationClient, Line, RetryPolicy
from subsidy_client.v1 import authorization_pb2 as apb

from server.commands.reference import publish_snapshot
from server.config import Config
from server.processes.alert_watch import run_alert_watch
from server.processes.app import Application
from server.processes.writer import initialize, shard_ledgers_of
from storage.cluster_dev import LocalCluster, command
from storage.devenv import Services
from storage.postgres.reference import fetch_reference
from storage.redis.cluster.shards import ShardLayout
from storage.redis.keys import Keys
from tests.conftest import ROOT, Environment, isolated_environment, running_gateway
from tests.integration import cluster_fixtures
from tests.integration.test_cluster_gateway import (
    GTIN,
    PRICE_FEN,
    SHARDS,
    SUBSIDY_FEN,
    cluster_config,
    consumers_per_shard,
    published,
)

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client

TERMINAL = "t-main-01"
NO_RETRY = RetryPolicy(max_attempts=1)
# A campaign of 20 sales' budget: one sale in each of the 6 shards is 30 % of it (each shard's
# own counts 5 %), a second round 60 %.
SALES = 20
THRESHOLDS = "25,50"


@dataclass
class World:
    env: Environment
    config: Config  # the cluster gateway's
    gateway: Application
    target: str


@pytest.fixture(scope="module")
async def world(services: Services, redis_cluster: LocalCluster) -> AsyncIterator[World]:
    """A database of its own (no other module's alerts or sales), its credentials published to
    the cluster deployment's keys, and a cluster gateway over it."""
    async with isolated_environment(services) as env:
        config = cluster_config(env, redis_cluster, "ca" + secrets.token_hex(4))
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await publish_snapshot(config, await fetch_reference(connection, campaign_ids=[]))
        finally:
            await connection.close()
        async with running_gateway(config) as gateway:
            yield World(env, config, gateway, f"127.0.0.1:{gateway.port}")


async def sell(world: World, campaign_id: str, consumers: list[str], *, captured: int = 0) -> None:
    """One sale to each consumer, the first ``captured`` of them captured."""
    secret = world.env.credentials[TERMINAL]
    async with AuthorizationClient(world.target, TERMINAL, secret, deadline_s=10.0, retry=NO_RETRY) as terminal:
        approved = []
        for consumer in consumers:
            answer = await terminal.authorize(
                campaign_id=campaign_id, consumer_key=consumer, lines=[Line("1", GTIN, PRICE_FEN)]
            )
            assert answer.decision == apb.DECISION_APPROVED and answer.subsidy_fen == SUBSIDY_FEN
            approved.append(answer.authorization_id)
        for authorization_id in approved[:captured]:
            await terminal.capture(authorization_id)


async def committed_by_shard(cluster: RedisCluster, layout: ShardLayout, campaign_id: str) -> list[int]:
    """Each shard's reserved + spent subsidy of the campaign's fridge budget."""
    committed = []
    for keys in layout.keys:
        reserved, spent = await cluster.hmget(keys.budget(campaign_id), ["fridge:reserved", "fridge:spent"])
        committed.append(int(reserved or 0) + int(spent or 0))
    return committed


async def alerts_of(dsn: str, campaign_id: str) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT alert_key, raised_by FROM supervision_alerts WHERE campaign_id = $1 ORDER BY threshold_percent",
            campaign_id,
        )
    finally:
        await connection.close()
    return [(row["alert_key"], row["raised_by"]) for row in rows]


async def wait_for_alerts(dsn: str, campaign_id: str, count: int, within_s: float = 30.0) -> list[tuple[str, str]]:
    """The campaign's alerts once there are ``count`` (or what there is after ``within_s``)."""
    found: list[tuple[str, str]] = []
    for _ in range(int(within_s / 0.2)):
        found = await alerts_of(dsn, campaign_id)
        if len(found) >= count:
            break
        await asyncio.sleep(0.2)
    return found


def threshold_key(campaign_id: str, percent: int) -> str:
    return f"BUDGET_THRESHOLD:{campaign_id}:fridge:{percent}"


async def test_the_writer_process_records_a_crossing_summed_over_the_shards_once_with_nobody_watching(
    world: World, cluster_client: RedisCluster, services: Services
) -> None:
    """A ``python -m server.ledger writer`` process of the deployment (SUBSIDY_REDIS_SHARDS=6,
    an alert check a second, thresholds 25 % and 50 %). One sale in each shard (3 captured):
    6 x 5 % = 30 % of the budget, so the 25 % crossing is recorded, by the writer; a second round
    in each shard (60 %) records the 50 % one, and the 25 % alert is still recorded once after the
    checks between. Each shard's own counts stay under both thresholds, the one Redis holds no
    counts of the campaign (what the check read before: no alert ever), and no WatchFunds stream
    was ever open (the gateway's poller never ran)."""
    layout = ShardLayout(world.config.redis_prefix, SHARDS)
    campaign_id = await published(world.env, world.config, sales=SALES)
    first, second = consumers_per_shard(layout, 1), consumers_per_shard(layout, 1)
    consumer = "writer-cluster-alerts"
    host, port = world.config.redis_cluster_nodes.split(",")[0].split(":")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.ledger",
        "writer",
        cwd=ROOT,
        env={
            **os.environ,
            "SUBSIDY_PG_DSN": world.env.pg_dsn,
            "SUBSIDY_REDIS_URL": world.env.redis_url,
            "SUBSIDY_REDIS_PREFIX": layout.prefix,
            "SUBSIDY_REDIS_CLUSTER_NODES": f"{host}:{port}",
            "SUBSIDY_REDIS_SHARDS": str(SHARDS),
            "SUBSIDY_WRITER_CONSUMER": consumer,
            "SUBSIDY_ALERT_CHECK_INTERVAL_S": "1",
            "SUBSIDY_ALERT_THRESHOLDS": THRESHOLDS,
            "SUBSIDY_LOG_LEVEL": "WARNING",
        },
    )
    one_redis = Redis.from_url(services.redis_url)
    try:
        await sell(world, campaign_id, first, captured=3)
        assert await committed_by_shard(cluster_client, layout, campaign_id) == [SUBSIDY_FEN] * SHARDS
        assert not await one_redis.exists(Keys(layout.prefix).budget(campaign_id))
        assert await wait_for_alerts(world.env.pg_dsn, campaign_id, 1) == [(threshold_key(campaign_id, 25), consumer)]

        await sell(world, campaign_id, second)
        assert await committed_by_shard(cluster_client, layout, campaign_id) == [2 * SUBSIDY_FEN] * SHARDS
        assert 2 * SUBSIDY_FEN * 100 < 25 * SALES * SUBSIDY_FEN  # no shard alone reaches even 25 %
        assert await wait_for_alerts(world.env.pg_dsn, campaign_id, 2) == [
            (threshold_key(campaign_id, 25), consumer),
            (threshold_key(campaign_id, 50), consumer),
        ]
        poller = world.gateway.poller
        assert poller is not None and not poller.running and poller.starts == 0
        assert process.returncode is None  # the check never stopped the writer
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await one_redis.aclose()


async def test_a_check_that_cannot_read_a_shard_is_logged_and_the_next_one_records_the_crossing(
    world: World, redis_cluster: LocalCluster, cluster_client: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer's alert check over the writer's own cluster client (shard_ledgers_of, its slot
    map loaded), checking every second, started while the primary serving shard 0 answers no command for 8 s (CLIENT
    PAUSE ALL; no failover: the cluster bus still answers). Its first check cannot read that shard:
    it fails after the sharded reader's 5 s, logged, and the check goes on; a later one reads the
    shards once the primary answers and records the 25 % crossing, once."""
    caplog.set_level(logging.WARNING, logger="subsidy.supervision")
    layout = ShardLayout(world.config.redis_prefix, SHARDS)
    campaign_id = await published(world.env, world.config, sales=SALES)
    await sell(world, campaign_id, consumers_per_shard(layout, 1))
    assert await committed_by_shard(cluster_client, layout, campaign_id) == [SUBSIDY_FEN] * SHARDS
    config = replace(
        world.config, alert_check_interval_s=1, alert_thresholds=THRESHOLDS, writer_consumer="writer-paused"
    )
    shard_ledgers = shard_ledgers_of(config)
    await initialize(shard_ledgers.cluster)  # as the writer does before starting its tasks
    primary = redis_cluster.primary_of_slot(redis_cluster.slot_of(layout.keys[0].budget(campaign_id)))
    redis = Redis.from_url(world.env.redis_url)
    stopping = asyncio.Event()
    task: asyncio.Task[Any] | None = None
    try:
        command(primary.client(), "CLIENT", "PAUSE", 8000, "ALL")
        task = asyncio.create_task(run_alert_watch(config, redis, stopping, shard_ledgers.cluster))
        alerts = await wait_for_alerts(world.env.pg_dsn, campaign_id, 1, within_s=40.0)
        assert alerts == [(threshold_key(campaign_id, 25), "writer-paused")]
        failures = [record for record in caplog.records if record.getMessage() == "supervision alert check failed"]
        assert failures, caplog.text
        assert not task.done()
    finally:
        command(primary.client(), "CLIENT", "UNPAUSE")
        stopping.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await shard_ledgers.cluster.aclose()
        await redis.aclose()
