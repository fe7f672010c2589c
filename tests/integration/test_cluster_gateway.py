"""The gateway on a Redis Cluster (issue 16, server/processes/sharded_app.py): with
SUBSIDY_REDIS_CLUSTER_NODES and SUBSIDY_REDIS_SHARDS it serves the sale path in consumer shards
(docs/scale-out.md 2.0), signed gRPC calls from the Python client end to end."""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import yaml
from redis.asyncio.cluster import RedisCluster
from subsidy_client import AuthorizationClient, Line
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1 import campaign_pb2, campaign_pb2_grpc

from server.commands.reference import SHARED_RISK_LIMITS, load, publish_snapshot
from server.config import Config
from server.domain.reference import ReferenceError
from storage.cluster_dev import LocalCluster
from storage.postgres.reference import fetch_reference
from storage.redis.cluster.keeper import keep
from storage.redis.cluster.shard_budget import ShardBudget
from storage.redis.cluster.shards import ShardLayout
from tests.conftest import Environment, load_document, running_gateway
from tests.integration import cluster_fixtures
from tests.integration.loadgen import Job, run_job
from tests.integration.test_concurrency import free_port, server_processes

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client

GTIN = "6970000000024"  # a grade-2 fridge without a serial
PRICE_FEN, SUBSIDY_FEN = 300_000, 60_000  # 20%
SHARDS = 6


def campaign_document(campaign_id: str, sales: int) -> dict[str, object]:
    return {
        "campaigns": [
            {
                "id": campaign_id,
                "starts_at": "2020-01-01T00:00:00+00:00",
                "ends_at": "2099-01-01T00:00:00+00:00",
                "rules": [
                    {
                        "category": "fridge",
                        "kind": "PERCENT",
                        "rates_bp": {"2": 2000},
                        "cap_fen": 200_000,
                        "per_person_limit": 1,
                        "budget_fen": sales * SUBSIDY_FEN,
                    }
                ],
            }
        ]
    }


def cluster_config(environment: Environment, redis_cluster: LocalCluster, prefix: str) -> Config:
    return environment.config(
        redis_prefix=prefix,
        redis_cluster_nodes=",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes),
        redis_shards=SHARDS,
    )


async def publish_document(environment: Environment, config: Config, document: dict[str, Any]) -> None:
    """Saves the document's campaigns in the run's database and publishes only them into the
    cluster's shards, each shard funded its slice: other modules' campaigns in the run's
    database may carry rules a cluster refuses (terminal and merchant velocity limits)."""
    await load_document(environment, document)
    campaign_ids = [campaign["id"] for campaign in document["campaigns"]]
    connection = await asyncpg.connect(environment.pg_dsn, timeout=10)
    try:
        await publish_snapshot(config, await fetch_reference(connection, campaign_ids=campaign_ids))
    finally:
        await connection.close()


async def published(environment: Environment, config: Config, sales: int) -> str:
    """A campaign of ``sales`` sales' budget, published into the cluster's shards; its id."""
    campaign_id = "c-cl-" + secrets.token_hex(4)
    await publish_document(environment, config, campaign_document(campaign_id, sales))
    return campaign_id


def consumers_per_shard(layout: ShardLayout, count: int) -> list[str]:
    found: dict[int, list[str]] = {shard: [] for shard in range(layout.count)}
    while any(len(keys) < count for keys in found.values()):
        key = secrets.token_hex(32)
        if len(found[layout.shard_of_consumer(key)]) < count:
            found[layout.shard_of_consumer(key)].append(key)
    return [key for keys in found.values() for key in keys]


def cluster_env(config: Config) -> dict[str, str]:
    """What ``python -m server`` (test_concurrency.server_processes) needs beyond the run's
    settings to serve ``config``'s shards."""
    return {
        "SUBSIDY_REDIS_PREFIX": config.redis_prefix,
        "SUBSIDY_REDIS_CLUSTER_NODES": config.redis_cluster_nodes,
        "SUBSIDY_REDIS_SHARDS": str(config.redis_shards),
        "SUBSIDY_LOG_LEVEL": "WARNING",
    }


def client_jobs(
    environment: Environment, port: int, campaign_id: str, requests: list[tuple[str, str, str]]
) -> list[Job]:
    """Three client processes' shares of ``requests`` (request id, consumer, serial), 8 channels
    each, every call re-sent with its request id on UNAVAILABLE up to 5 times."""
    return [
        Job(
            target=f"127.0.0.1:{port}",
            terminal_id="t-main-01",
            secret=environment.credentials["t-main-01"],
            campaign_id=campaign_id,
            gtin=GTIN,
            price_fen=PRICE_FEN,
            requests=requests[worker::3],
            channels=8,
            max_attempts=5,
        )
        for worker in range(3)
    ]


@pytest.fixture
async def cluster_gateway(environment: Environment, redis_cluster: LocalCluster) -> AsyncIterator[tuple[Config, str]]:
    config = cluster_config(environment, redis_cluster, "cg" + secrets.token_hex(4))
    async with running_gateway(config) as application:
        yield replace(config, listen=f"127.0.0.1:{application.port}"), f"127.0.0.1:{application.port}"


async def test_the_gateway_serves_sales_in_shards_end_to_end(
    environment: Environment, cluster_gateway: tuple[Config, str], cluster_client: RedisCluster
) -> None:
    """Six shards of 2 sales each; 4 consumers a shard, each asking twice: exactly 12 approved,
    2 a shard, nobody twice; capture, void and GetAuthorization find each authorization's shard."""
    config, target = cluster_gateway
    campaign_id = await published(environment, config, sales=2 * SHARDS)
    layout = ShardLayout(config.redis_prefix, SHARDS)
    client = AuthorizationClient(target, "t-main-01", environment.credentials["t-main-01"])
    try:
        answers = []
        for consumer in consumers_per_shard(layout, 4) * 2:
            response = await client.authorize(
                campaign_id=campaign_id, consumer_key=consumer, lines=[Line("1", GTIN, PRICE_FEN)]
            )
            answers.append((consumer, response))
        approved = [(consumer, response) for consumer, response in answers if response.decision == pb.DECISION_APPROVED]
        assert len(approved) == 2 * SHARDS and len({consumer for consumer, _ in approved}) == 2 * SHARDS
        assert Counter(layout.shard_of_consumer(consumer) for consumer, _ in approved) == dict.fromkeys(
            range(SHARDS), 2
        )
        assert {
            pb.DeclineReason.Name(response.decline_reason)
            for _, response in answers
            if response.decision != pb.DECISION_APPROVED
        } == {"DECLINE_REASON_BUDGET_EXHAUSTED", "DECLINE_REASON_CONSUMER_LIMIT_REACHED"}
        assert all(response.subsidy_fen == SUBSIDY_FEN for _, response in approved)
        first, second = approved[0][1].authorization_id, approved[1][1].authorization_id
        await client.capture(first)
        await client.void(second)
        assert (await client.get_authorization(first)).state == pb.AUTHORIZATION_STATE_CAPTURED
        assert (await client.get_authorization(second)).state == pb.AUTHORIZATION_STATE_VOIDED
        budget = ShardBudget(cluster_client, layout)
        funds = await budget.read(campaign_id, "fridge")
        assert sum(state.spent for state in funds) == SUBSIDY_FEN
        assert sum(state.reserved for state in funds) == (2 * SHARDS - 2) * SUBSIDY_FEN
        await budget.aclose()
    finally:
        await client.close()


async def test_what_the_cluster_gateway_does_not_serve_yet_is_refused_unimplemented(
    cluster_gateway: tuple[Config, str],
) -> None:
    """The operator services are not registered on a cluster gateway: UNIMPLEMENTED from gRPC
    itself, never served from keys no sale reads."""
    _, target = cluster_gateway
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as unserved:
            await campaign_pb2_grpc.CampaignServiceStub(channel).GetCampaign(campaign_pb2.GetCampaignRequest())
        assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_device_is_subsidised_once_across_shards_through_the_gateway(
    environment: Environment, cluster_gateway: tuple[Config, str]
) -> None:
    """One serial sold to consumers of different shards: the first sale is approved, the others
    declined SERIAL_ALREADY_SUBSIDISED; a retry of the first (same request id) replays its
    approval; once it is voided the device sells again, and once that sale is captured it never
    sells again."""
    config, target = cluster_gateway
    campaign_id = await published(environment, config, sales=4 * SHARDS)
    layout = ShardLayout(config.redis_prefix, SHARDS)
    buyers = consumers_per_shard(layout, 1)  # one consumer in each shard
    device = "SN" + secrets.token_hex(6)
    client = AuthorizationClient(target, "t-main-01", environment.credentials["t-main-01"])

    async def buy(consumer: str, request_id: str | None = None) -> pb.AuthorizeResponse:
        return await client.authorize(
            campaign_id=campaign_id,
            consumer_key=consumer,
            lines=[Line("1", GTIN, PRICE_FEN, device)],
            request_id=request_id,
        )

    def outcome(response: pb.AuthorizeResponse) -> str:
        if response.decision == pb.DECISION_APPROVED:
            return "APPROVED"
        return pb.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")

    try:
        request_id = str(uuid.uuid4())
        first = await buy(buyers[0], request_id)
        assert outcome(first) == "APPROVED"
        assert [outcome(await buy(buyer)) for buyer in buyers[1:]] == ["SERIAL_ALREADY_SUBSIDISED"] * (SHARDS - 1)
        again = await buy(buyers[0], request_id)
        assert outcome(again) == "APPROVED" and again.authorization_id == first.authorization_id
        await client.void(first.authorization_id)
        second = await buy(buyers[1])
        assert outcome(second) == "APPROVED"
        await client.capture(second.authorization_id)
        assert [outcome(await buy(buyer)) for buyer in buyers[2:]] == ["SERIAL_ALREADY_SUBSIDISED"] * (SHARDS - 2)
    finally:
        await client.close()


@pytest.mark.slow
async def test_two_gateway_workers_and_three_client_processes_approve_exactly_the_budget(
    environment: Environment, redis_cluster: LocalCluster, cluster_client: RedisCluster, tmp_path: Path
) -> None:
    """``python -m server`` (2 worker processes) on the cluster, 3 client processes of 8 channels:
    6 shards of 20 sales (120), 40 consumers a shard each asking twice (480 calls): exactly 120
    approved, 20 a shard, nobody twice, each shard's reserved budget equal to its approvals."""
    prefix = "cg" + secrets.token_hex(4)
    config = cluster_config(environment, redis_cluster, prefix)
    campaign_id = await published(environment, config, sales=20 * SHARDS)
    layout = ShardLayout(prefix, SHARDS)
    consumers = consumers_per_shard(layout, 40)
    requests = [(str(uuid.uuid4()), consumer, "") for consumer in consumers * 2]
    port = free_port()
    async with server_processes(environment, port, tmp_path / "server.log", extra_env=cluster_env(config)):
        jobs = client_jobs(environment, port, campaign_id, requests)
        context = multiprocessing.get_context("spawn")
        with context.Pool(len(jobs)) as pool:
            results = await asyncio.get_running_loop().run_in_executor(None, pool.map, run_job, jobs)
    outcomes = [outcome for result in results for outcome in result]
    assert not [outcome.error for outcome in outcomes if outcome.error]
    approved = [outcome for outcome in outcomes if outcome.decision == "DECISION_APPROVED"]
    assert len(approved) == 20 * SHARDS and len({outcome.consumer for outcome in approved}) == 20 * SHARDS
    assert Counter(layout.shard_of_consumer(outcome.consumer) for outcome in approved) == dict.fromkeys(
        range(SHARDS), 20
    )
    assert all(
        layout.shard_of_id(outcome.authorization_id) == layout.shard_of_consumer(outcome.consumer)
        for outcome in approved
    )
    budget = ShardBudget(cluster_client, layout)
    try:
        assert [state.reserved for state in await budget.read(campaign_id, "fridge")] == [20 * SUBSIDY_FEN] * SHARDS
    finally:
        await budget.aclose()


async def test_the_keeper_funds_a_released_tranche_and_refills_a_crowded_shard(
    environment: Environment, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    """The gateway's keeper (every sweep, 50 ms here): a campaign of 12 sales' budget, half
    released now and half 2 s later, over 6 shards; a crowd hashed to shard 0 alone. Before the
    release at most the first half is approved; after it, the keeper has funded the rest and
    refilled shard 0 from the others, so the crowd gets more than shard 0's own slice, and never
    more than the budget; conserved and within budget throughout."""
    prefix = "cg" + secrets.token_hex(4)
    config = replace(cluster_config(environment, redis_cluster, prefix), sweep_interval_ms=50)
    campaign_id = "c-cl-" + secrets.token_hex(4)
    release_ms = int(time.time() * 1000) + 2_000
    document = campaign_document(campaign_id, 12)
    document["campaigns"][0]["rules"][0]["tranches"] = [  # type: ignore[index]
        {"release_at": "2020-01-01T00:00:00+00:00", "amount_fen": 6 * SUBSIDY_FEN},
        {"release_at": datetime.fromtimestamp(release_ms / 1000, UTC).isoformat(), "amount_fen": 6 * SUBSIDY_FEN},
    ]
    await publish_document(environment, config, document)
    layout = ShardLayout(prefix, SHARDS)
    budget = ShardBudget(cluster_client, layout)
    crowd = [consumer for consumer in consumers_per_shard(layout, 40) if layout.shard_of_consumer(consumer) == 0]
    async with running_gateway(config) as application:
        client = AuthorizationClient(f"127.0.0.1:{application.port}", "t-main-01", environment.credentials["t-main-01"])
        try:
            approved = 0
            for consumer in crowd:
                response = await client.authorize(
                    campaign_id=campaign_id, consumer_key=consumer, lines=[Line("1", GTIN, PRICE_FEN)]
                )
                approved += response.decision == pb.DECISION_APPROVED
                audit = await budget.audit(campaign_id, "fridge")
                assert audit.conserved and audit.within_budget
                if time.time() * 1000 < release_ms - 200:
                    assert sum(state.funded for state in await budget.read(campaign_id, "fridge")) == 6 * SUBSIDY_FEN
                    assert approved <= 6
                await asyncio.sleep(0.1)  # a sale every 100 ms: the crowd outlasts the release
        finally:
            await client.close()
    funds = await budget.read(campaign_id, "fridge")
    await budget.aclose()
    assert sum(state.funded for state in funds) == 12 * SUBSIDY_FEN  # the second tranche funded
    assert 2 < approved <= 12  # more than shard 0's own slice of the 12
    assert funds[0].reserved == approved * SUBSIDY_FEN


async def test_a_keeper_whose_clock_runs_ahead_funds_no_tranche_early(
    environment: Environment,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tranche times are judged by the cluster's clock (Redis TIME where the plans are), not the
    keeper's process: a gateway whose clock is two hours ahead funds nothing of a tranche due in
    one hour (before, it funded the tranche at once)."""
    prefix = "cg" + secrets.token_hex(4)
    config = cluster_config(environment, redis_cluster, prefix)
    campaign_id = "c-cl-" + secrets.token_hex(4)
    document = campaign_document(campaign_id, 12)
    document["campaigns"][0]["rules"][0]["tranches"] = [  # type: ignore[index]
        {"release_at": "2020-01-01T00:00:00+00:00", "amount_fen": 6 * SUBSIDY_FEN},
        {"release_at": datetime.fromtimestamp(time.time() + 3600, UTC).isoformat(), "amount_fen": 6 * SUBSIDY_FEN},
    ]
    await publish_document(environment, config, document)
    layout = ShardLayout(prefix, SHARDS)
    budget = ShardBudget(cluster_client, layout)
    try:
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 7200)
        await keep(budget, layout.control)
        monkeypatch.undo()
        assert sum(state.funded for state in await budget.read(campaign_id, "fridge")) == 6 * SUBSIDY_FEN
    finally:
        await budget.aclose()


async def test_risk_limits_counted_over_every_consumer_are_refused_on_a_cluster(
    environment: Environment, redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    """Each shard counts its own sales, so a terminal's or a merchant's velocity limit or the
    price flag would allow up to 6 times its value: refused, naming the field, before anything
    is written."""
    config = cluster_config(environment, redis_cluster, "cg" + secrets.token_hex(4))
    price_flag = {"price_flag_min_sales": 5, "price_flag_ratio_percent": 150}
    cases = [(name, {name: 5}) for name in SHARED_RISK_LIMITS if not name.startswith("price_flag")]
    cases.append(("price_flag_min_sales", price_flag))
    assert {name for name, _ in cases} | set(price_flag) == set(SHARED_RISK_LIMITS)
    for name, limits in cases:
        document = campaign_document("c-cl-" + secrets.token_hex(4), SHARDS)
        document["campaigns"][0]["risk_limits"] = {**limits, "consumer_sales_per_hour": 2}  # type: ignore[index]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        pattern = f"campaigns\\[0\\].risk_limits.{name}: not enforced across consumer shards"
        with pytest.raises(ReferenceError, match=pattern):
            await load(config, path, None)
        campaign_id = document["campaigns"][0]["id"]  # type: ignore[index]
        connection = await asyncpg.connect(environment.pg_dsn, timeout=10)
        try:
            assert await connection.fetchval("SELECT count(*) FROM campaigns WHERE campaign_id = $1", campaign_id) == 0
        finally:
            await connection.close()


@pytest.mark.parametrize(
    ("limit", "reason"),
    [
        ({"per_merchant_daily_limit": 2}, pb.DECLINE_REASON_MERCHANT_DAILY_LIMIT_REACHED),
        ({"risk_limits": {"consumer_sales_per_hour": 2}}, pb.DECLINE_REASON_CONSUMER_VELOCITY_HOUR),
    ],
    ids=["per_merchant_daily_limit", "consumer_sales_per_hour"],
)
async def test_limits_counted_per_consumer_are_exact_on_a_cluster(
    environment: Environment,
    cluster_gateway: tuple[Config, str],
    limit: dict[str, object],
    reason: int,
) -> None:
    """The per-merchant daily limit (a consumer's payments at one merchant in a day) and the
    consumer's hourly velocity are counted in the consumer's shard: one consumer in each of the
    6 shards buying 3 times, limit 2: exactly 2 approved each, the third declined with the
    limit's reason."""
    config, target = cluster_gateway
    campaign_id = "c-cl-" + secrets.token_hex(4)
    document = campaign_document(campaign_id, 3 * SHARDS)
    document["campaigns"][0].update(limit)  # type: ignore[index]
    document["campaigns"][0]["rules"][0]["per_person_limit"] = 10  # type: ignore[index]
    await publish_document(environment, config, document)
    layout = ShardLayout(config.redis_prefix, SHARDS)
    client = AuthorizationClient(target, "t-main-01", environment.credentials["t-main-01"])
    try:
        for consumer in consumers_per_shard(layout, 1):
            answers = [
                await client.authorize(
                    campaign_id=campaign_id, consumer_key=consumer, lines=[Line("1", GTIN, PRICE_FEN)]
                )
                for _ in range(3)
            ]
            assert [answer.decision for answer in answers] == [pb.DECISION_APPROVED] * 2 + [pb.DECISION_DECLINED]
            assert answers[2].decline_reason == reason
    finally:
        await client.close()
