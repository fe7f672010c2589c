"""The gateway on a Redis Cluster under bad operations (issue 16, "Bad input and operations"):
a slot moved while it serves, and a slot lost (its primary and its replica both down).

- A moved slot: the calls of the moving shard meet MOVED, ASK or TRYAGAIN, which
  ``AcknowledgedScripts`` re-sends (or, past its deadline, answers UNAVAILABLE, which the till
  re-sends with the same request_id); never a wrong answer: exactly the budget, nobody twice, one
  ``AUTHORIZED`` event per approval.
- A lost slot: the shard's sales are answered UNAVAILABLE with the documented retry advice
  within the scripts' deadline while the other shards serve; once the nodes are back the retry
  acts once, and the holds of the outage are expired by the shard sweeper, their budget released.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio.cluster import RedisCluster
from subsidy_client import AuthorizationClient, Line, RetryPolicy, SubsidyError
from subsidy_client.v1 import authorization_pb2 as pb

from storage.cluster_dev import LocalCluster, command
from storage.redis.cluster.shards import ShardLayout
from tests.conftest import Environment, running_gateway
from tests.integration import cluster_fixtures
from tests.integration.loadgen import Outcome, run_job
from tests.integration.test_cluster_gateway import (
    GTIN,
    PRICE_FEN,
    SHARDS,
    SUBSIDY_FEN,
    client_jobs,
    cluster_config,
    cluster_env,
    consumers_per_shard,
    published,
)
from tests.integration.test_cluster_shards import ledger_events
from tests.integration.test_concurrency import free_port, server_processes

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client

SALES_PER_SHARD = 30
DEADLINE_S = 5.0  # AcknowledgedScripts' default deadline_s, which the gateway uses


async def reserved_per_shard(client: RedisCluster, layout: ShardLayout, campaign_id: str) -> list[int]:
    return [int(await client.hget(keys.budget(campaign_id), "fridge:reserved") or 0) for keys in layout.keys]


async def drive_while(
    environment: Environment,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    tmp_path: Path,
    fault: Callable[[ShardLayout], Awaitable[None]],
) -> tuple[ShardLayout, str, list[Outcome]]:
    """``python -m server`` (2 workers) on the cluster and 3 client processes of 8 channels:
    6 shards of 30 sales, 60 consumers a shard each asking twice (720 calls, each re-sent up to 5
    times on UNAVAILABLE with its request_id); ``fault`` runs once 30 sales have been approved."""
    prefix = "cf" + secrets.token_hex(4)
    config = cluster_config(environment, redis_cluster, prefix)
    campaign_id = await published(environment, config, sales=SALES_PER_SHARD * SHARDS)
    layout = ShardLayout(prefix, SHARDS)
    requests = [(str(uuid.uuid4()), consumer, "") for consumer in consumers_per_shard(layout, 60) * 2]
    port = free_port()
    async with server_processes(environment, port, tmp_path / "server.log", extra_env=cluster_env(config)):
        jobs = client_jobs(environment, port, campaign_id, requests)
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            running = asyncio.get_running_loop().run_in_executor(None, pool.map, run_job, jobs)
            for _ in range(6000):  # sales flowing (at most 60 s)
                if sum([await cluster_client.xlen(keys.ledger) for keys in layout.keys]) >= 30 or running.done():
                    break
                await asyncio.sleep(0.01)
            assert not running.done(), "the load ended before the fault"
            await fault(layout)
            assert not running.done(), "the load ended during the fault"
            results = await running
    return layout, campaign_id, [outcome for result in results for outcome in result]


def redirections(cluster: LocalCluster) -> Counter[str]:
    """MOVED, ASK and TRYAGAIN errors answered so far by the live nodes (INFO errorstats)."""
    counts: Counter[str] = Counter()
    for node in cluster.nodes:
        if node.alive:
            for name, stats in node.client().info("errorstats").items():
                if name.removeprefix("errorstat_") in ("MOVED", "ASK", "TRYAGAIN"):
                    counts[name.removeprefix("errorstat_")] += int(stats["count"])
    return counts


async def assert_exactly_the_budget(
    cluster_client: RedisCluster, layout: ShardLayout, campaign_id: str, outcomes: list[Outcome]
) -> None:
    """Every call answered; exactly each shard's slice approved, nobody twice, each shard's
    reserved budget equal to its approvals, and each approval's AUTHORIZED event in its shard's
    stream exactly once."""
    assert not [outcome.error for outcome in outcomes if outcome.error]
    approved = [outcome for outcome in outcomes if outcome.decision == "DECISION_APPROVED"]
    assert len({outcome.consumer for outcome in approved}) == len(approved) == SALES_PER_SHARD * SHARDS
    assert Counter(layout.shard_of_consumer(outcome.consumer) for outcome in approved) == dict.fromkeys(
        range(SHARDS), SALES_PER_SHARD
    )
    assert {outcome.reason for outcome in outcomes if outcome.decision != "DECISION_APPROVED"} <= {
        "DECLINE_REASON_BUDGET_EXHAUSTED",
        "DECLINE_REASON_CONSUMER_LIMIT_REACHED",
    }
    assert await reserved_per_shard(cluster_client, layout, campaign_id) == [SALES_PER_SHARD * SUBSIDY_FEN] * SHARDS
    authorized = Counter(
        (shard, event["authorization_id"])
        for shard, event in await ledger_events(cluster_client, layout)
        if event["type"] == "AUTHORIZED"
    )
    assert authorized == Counter((layout.shard_of_id(o.authorization_id), o.authorization_id) for o in approved)


@pytest.mark.slow
@pytest.mark.parametrize("key_by_key", [False, True], ids=["whole-slot", "key-by-key"])
async def test_a_slot_moved_under_load_gives_no_wrong_answer(
    environment: Environment,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    tmp_path: Path,
    key_by_key: bool,
) -> None:
    """Shard 0's slot moves to another primary while 3 client processes sell through 2 gateway
    workers: all its keys at once (MOVED after), or one MIGRATE per key (ASK and TRYAGAIN while
    the slot is half moved). Exactly the budget, nobody twice, no error the tills did not retry."""
    moved: dict[str, Any] = {}  # the slot and its new primary
    before = redirections(redis_cluster)

    async def move(layout: ShardLayout) -> None:
        slot = redis_cluster.slot_of(layout.keys[0].ledger)
        source = redis_cluster.primary_of_slot(slot)
        target = next(node for node in redis_cluster.primaries_now() if node is not source)

        def migrate() -> None:
            if key_by_key:
                redis_cluster.begin_slot_move(slot, target)
                redis_cluster.migrate_keys(slot, source, target, batch=1)
                redis_cluster.finish_slot_move(slot, source, target)
            else:
                redis_cluster.move_slot(slot, target)

        await asyncio.to_thread(migrate)
        moved.update(slot=slot, target=target)

    layout, campaign_id, outcomes = await drive_while(environment, redis_cluster, cluster_client, tmp_path, move)
    assert redis_cluster.primary_of_slot(moved["slot"]) is moved["target"]
    felt = redirections(redis_cluster) - before
    # The move was felt: redirected calls (MOVED after it; ASK and TRYAGAIN while half moved).
    assert felt["ASK"] + felt["TRYAGAIN"] > 0 if key_by_key else felt["MOVED"] > 0, felt
    await assert_exactly_the_budget(cluster_client, layout, campaign_id, outcomes)


@contextmanager
def partial_coverage_served(cluster: LocalCluster) -> Iterator[None]:
    """``cluster-require-full-coverage no`` on every node for the body: the slots that lost
    every node are down, the others served (with the default, the whole cluster refuses)."""
    live = [node for node in cluster.nodes if node.alive]
    for node in live:
        command(node.client(), "CONFIG", "SET", "cluster-require-full-coverage", "no")
    try:
        yield
    finally:
        for node in cluster.nodes:
            if node.alive:
                command(node.client(), "CONFIG", "SET", "cluster-require-full-coverage", "yes")


async def test_a_lost_slot_answers_unavailable_and_its_holds_are_swept_once_it_is_back(
    environment: Environment, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    """The primary of shard 0 and its replica are killed (the slot has no node). A sale in that
    shard: UNAVAILABLE, DEPENDENCY_UNAVAILABLE, "retry with the same request_id", within the
    scripts' deadline; a sale in a shard on another primary is approved, and a hold there expires
    meanwhile. Nodes restarted: the retry (same request_id) is approved once and replays; the
    hold made before the outage expires in the sweep, and every shard's budget is released."""
    hold_ttl_s = 3
    prefix = "cf" + secrets.token_hex(4)
    config = replace(cluster_config(environment, redis_cluster, prefix), hold_ttl_s=hold_ttl_s, sweep_interval_ms=200)
    campaign_id = await published(environment, config, sales=2 * SHARDS)
    layout = ShardLayout(prefix, SHARDS)
    consumers = consumers_per_shard(layout, 2)
    mine = {shard: [c for c in consumers if layout.shard_of_consumer(c) == shard] for shard in range(SHARDS)}
    victim = redis_cluster.primary_of_slot(redis_cluster.slot_of(layout.keys[0].ledger))
    live = next(
        shard
        for shard in range(SHARDS)
        if redis_cluster.primary_of_slot(redis_cluster.slot_of(layout.keys[shard].ledger)) is not victim
    )
    async with running_gateway(config) as application:
        target = f"127.0.0.1:{application.port}"
        client = AuthorizationClient(
            target,
            "t-main-01",
            environment.credentials["t-main-01"],
            deadline_s=3 * DEADLINE_S,
            retry=RetryPolicy(max_attempts=1),
        )

        async def sell(consumer: str, request_id: str | None = None) -> pb.AuthorizeResponse:
            return await client.authorize(
                campaign_id=campaign_id,
                consumer_key=consumer,
                lines=[Line("1", GTIN, PRICE_FEN)],
                request_id=request_id,
            )

        try:
            before = await sell(mine[0][0])  # a hold that will fall due during the outage
            live_before = await sell(mine[live][0])
            assert before.decision == live_before.decision == pb.DECISION_APPROVED
            (replica,) = redis_cluster.replicas_of(victim)
            with partial_coverage_served(redis_cluster):
                redis_cluster.kill(replica)  # first, so that nothing is promoted
                redis_cluster.kill(victim)
                request_id = str(uuid.uuid4())
                started = time.monotonic()
                with pytest.raises(SubsidyError) as refused:
                    await sell(mine[0][1], request_id)
                elapsed = time.monotonic() - started
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert refused.value.reason == "DEPENDENCY_UNAVAILABLE"
                assert "retry with the same request_id" in refused.value.message
                assert elapsed < DEADLINE_S + 2.0
                assert (await sell(mine[live][1])).decision == pb.DECISION_APPROVED
                # The live shard's sweep goes on: its first hold expires during the outage (read
                # on its primary: a cluster client's first command may pick the dead node).
                budget_key = layout.keys[live].budget(campaign_id)
                live_primary = redis_cluster.primary_of_slot(redis_cluster.slot_of(budget_key)).client()
                for _ in range(100):
                    if int(live_primary.hget(budget_key, "fridge:reserved")) == SUBSIDY_FEN:
                        break
                    await asyncio.sleep(0.1)
                assert int(live_primary.hget(budget_key, "fridge:reserved")) == SUBSIDY_FEN
                await asyncio.sleep(max(0.0, hold_ttl_s - (time.monotonic() - started)))  # shard 0's hold due
                redis_cluster.restart(victim)
                redis_cluster.restart(replica)
                await asyncio.to_thread(redis_cluster.wait_ok)
            retried = await sell(mine[0][1], request_id)
            assert retried.decision == pb.DECISION_APPROVED
            assert (await sell(mine[0][1], request_id)).authorization_id == retried.authorization_id
            assert (await client.get_authorization(before.authorization_id)).state in (
                pb.AUTHORIZATION_STATE_PENDING,
                pb.AUTHORIZATION_STATE_EXPIRED,
            )
            for _ in range(200):  # every hold expires in the sweep: nothing stays reserved
                if await reserved_per_shard(cluster_client, layout, campaign_id) == [0] * SHARDS:
                    break
                await asyncio.sleep(0.1)
            assert await reserved_per_shard(cluster_client, layout, campaign_id) == [0] * SHARDS
            for made in (before, retried, live_before):
                assert (await client.get_authorization(made.authorization_id)).state == pb.AUTHORIZATION_STATE_EXPIRED
        finally:
            await client.close()
    events = Counter(
        (event["type"], event["authorization_id"]) for _, event in await ledger_events(cluster_client, layout)
    )
    assert events[("AUTHORIZED", retried.authorization_id)] == 1
    assert events[("AUTHORIZED", before.authorization_id)] == 1
