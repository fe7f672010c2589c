"""The bureau's services on the cluster gateway (issue 16, server/processes/sharded_app.py): the
live fund view over every consumer shard's counts, the daily reports and bill reconciliation
(PostgreSQL only) served as on one Redis, the rest still refused UNIMPLEMENTED. Real signed
calls through a cluster gateway and a one-Redis gateway over the same database, a real six-node
Redis Cluster."""

from __future__ import annotations

import io
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta

import asyncpg
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio.cluster import RedisCluster
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy
from subsidy_client.errors import PermissionDenied
from subsidy_client.reconciliation import ReconciliationClient
from subsidy_client.reports import DailyReportClient
from subsidy_client.supervision import SupervisionClient
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import (
    blocklist_pb2,
    blocklist_pb2_grpc,
    campaign_pb2,
    campaign_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    complaints_pb2,
    complaints_pb2_grpc,
    credentials_pb2,
    credentials_pb2_grpc,
    exchange_pb2,
    exchange_pb2_grpc,
    merchant_pb2,
    merchant_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
)
from subsidy_client.v1 import reconciliation_pb2 as rpb
from subsidy_client.v1 import supervision_pb2 as spb

from server.commands.reference import publish_snapshot
from server.config import Config
from server.domain.daily_report import BusinessCalendar
from server.domain.ledger_sim import SimCampaign, SimSettings, simulate
from server.processes.sharded_app import SHARDED_SERVICE_NAMES
from storage.cluster_dev import LocalCluster
from storage.devenv import Services
from storage.postgres import daily_reports
from storage.postgres.reference import fetch_reference
from storage.redis.budget import SHARD_FUNDING_FIELDS, ShardedBudgetReader
from storage.redis.cluster.shards import ShardLayout
from tests.conftest import REFERENCE_FILE, Environment, isolated_environment, load_document, running_gateway
from tests.integration import cluster_fixtures
from tests.integration import test_cluster_claims as claims
from tests.integration.test_cluster_gateway import (
    GTIN,
    PRICE_FEN,
    SHARDS,
    SUBSIDY_FEN,
    cluster_config,
    consumers_per_shard,
)
from tests.integration.test_cluster_gateway import published as published_sales
from tests.integration.test_reconciliation import day_items, encode, mirrored, numbered

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client

CALENDAR = BusinessCalendar("Asia/Shanghai", "00:30")
OPERATOR, GOVERNMENT, AUDITOR = "op-auditor", "gov-cluster", "aud-cluster"
TERMINAL, PARTNER = "t-main-01", "p-wallet-01"
STAFF = [
    {"id": GOVERNMENT, "name": "区商务局 (read-only)", "role": "government"},
    {"id": AUDITOR, "name": "区审计局", "role": "auditor"},
]
CHANNEL = "wechat-pay"
NO_RETRY = RetryPolicy(max_attempts=1)
# What WatchFunds shows of a budget that does not depend on when it was read (the per-minute
# rates and the projected exhaustion do).
FIGURES = (
    "campaign_id",
    "category",
    "budget_fen",
    "released_fen",
    "reserved_fen",
    "spent_fen",
    "refunded_fen",
    "remaining_fen",
    "used_ratio",
    "qualification_quota",
    "qualifications_claimed",
)


@dataclass
class World:
    env: Environment
    credentials: dict[str, str]
    config: Config  # the cluster gateway's
    cluster: str  # the cluster gateway's address
    one_redis: str  # a one-Redis gateway's, over the same database
    days: list[date]  # two simulated ledger days, closed

    def supervision(self, target: str, caller_id: str) -> SupervisionClient:
        return SupervisionClient(target, caller_id, self.credentials[caller_id], retry=NO_RETRY)

    def reports(self, target: str, caller_id: str) -> DailyReportClient:
        return DailyReportClient(target, caller_id, self.credentials[caller_id], deadline_s=30.0, retry=NO_RETRY)

    def reconciliation(self, target: str, caller_id: str) -> ReconciliationClient:
        return ReconciliationClient(target, caller_id, self.credentials[caller_id], deadline_s=30.0, retry=NO_RETRY)


@pytest.fixture(scope="module")
async def world(services: Services, redis_cluster: LocalCluster) -> AsyncIterator[World]:
    """A database of its own with the bureau's government and auditor credentials and two
    simulated ledger days (nine and eight days ago), published to the cluster's shards; a
    cluster gateway and a one-Redis gateway over it, polling supervision every 100 ms."""
    async with isolated_environment(services) as env:
        document = yaml.safe_load(REFERENCE_FILE.read_text())
        document["operators"] = [*document["operators"], *STAFF]
        credentials = {**env.credentials, **await load_document(env, document)}
        first = CALENDAR.day_of(datetime.now(UTC)) - timedelta(days=9)
        start_ms = int(CALENDAR.bounds(first)[0].timestamp() * 1000)
        settings = SimSettings(
            campaigns=(SimCampaign("c-main", ("fridge", "tv")), SimCampaign("c-voucher", ("general",), 1000, 500)),
            merchants=("m-main", "m-other", "m-scoped"),
            seed=16,
            refund_share=0.2,
            partial_refund_share=0.3,
        )
        config = replace(cluster_config(env, redis_cluster, "co" + secrets.token_hex(4)), supervision_poll_ms=100)
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            await daily_reports.write_simulated(
                connection, simulate(settings, start_ms, start_ms + 2 * 86_400_000, 400)
            )
            # The credentials (no campaign: the test reference's carry rules a cluster refuses).
            await publish_snapshot(config, await fetch_reference(connection, campaign_ids=[]))
        finally:
            await connection.close()
        async with (
            running_gateway(config) as cluster_gateway,
            running_gateway(env.config(supervision_poll_ms=100)) as one_redis_gateway,
        ):
            yield World(
                env,
                credentials,
                config,
                f"127.0.0.1:{cluster_gateway.port}",
                f"127.0.0.1:{one_redis_gateway.port}",
                [first, first + timedelta(days=1)],
            )


def figures(snapshot: spb.WatchFundsResponse, campaign_id: str, category: str) -> dict[str, object]:
    (found,) = [item for item in snapshot.budgets if (item.campaign_id, item.category) == (campaign_id, category)]
    return {name: getattr(found, name) for name in FIGURES}


async def watched(world: World, target: str, caller_id: str) -> spb.WatchFundsResponse:
    """The second snapshot of a fresh stream: read by a poll that started after the call."""
    async with world.supervision(target, caller_id) as client:
        stream = client.watch()
        try:
            await anext(stream)
            return await anext(stream)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


async def sell(target: str, secret: str, campaign_id: str, consumers: list[str]) -> None:
    """One sale to each consumer; the first three captured, the first of them refunded."""
    async with AuthorizationClient(target, TERMINAL, secret, deadline_s=10.0, retry=NO_RETRY) as terminal:
        approved = []
        for consumer in consumers:
            answer = await terminal.authorize(
                campaign_id=campaign_id, consumer_key=consumer, lines=[Line("1", GTIN, PRICE_FEN)]
            )
            assert answer.decision == apb.DECISION_APPROVED and answer.subsidy_fen == SUBSIDY_FEN
            approved.append(answer.authorization_id)
        for authorization_id in approved[:3]:
            await terminal.capture(authorization_id)
        await terminal.refund(approved[0])


async def claim_all(target: str, secret: str, campaign_id: str, people: list[str]) -> None:
    async with QualificationClient(target, PARTNER, secret, retry=NO_RETRY) as wallet:
        for person in people:
            await claims.claim(wallet, campaign_id, person)


async def shard_sum(cluster: RedisCluster, layout: ShardLayout, key_of: str, campaign_id: str, field: str) -> int:
    total = 0
    for keys in layout.keys:
        key = keys.budget(campaign_id) if key_of == "budget" else keys.qualification_quota(campaign_id)
        total += int(await cluster.hget(key, field) or 0)
    return total


async def test_watch_funds_sums_every_shards_counts_as_one_redis_shows_them(
    world: World, cluster_client: RedisCluster
) -> None:
    """One sale in each of the six shards (three captured, one of those refunded) and one claim
    in each: WatchFunds on the cluster gateway shows reserved 3, spent 2, refunded 1 subsidies
    and 6 claims, exactly the sums of the shards' hashes, and the same figures (budget,
    released, remaining, used ratio too) as a one-Redis gateway shows for the same sales and
    claims; government and operator credentials watch, a terminal is refused."""
    layout = ShardLayout(world.config.redis_prefix, SHARDS)
    sales_campaign = await published_sales(world.env, world.config, sales=2 * SHARDS)
    quota_campaign = await claims.published(world.env, world.config, quota=2 * SHARDS)
    consumers = consumers_per_shard(layout, 1)
    people = claims.people_per_shard(layout, 1)
    for target in (world.cluster, world.one_redis):
        await sell(target, world.credentials[TERMINAL], sales_campaign, consumers)
        await claim_all(target, world.credentials[PARTNER], quota_campaign, people)

    sums = {
        name: await shard_sum(cluster_client, layout, "budget", sales_campaign, f"fridge:{name}")
        for name in ("reserved", "spent", "refunded")
    }
    assert sums == {"reserved": 3 * SUBSIDY_FEN, "spent": 2 * SUBSIDY_FEN, "refunded": SUBSIDY_FEN}
    claimed = await shard_sum(cluster_client, layout, "quota", quota_campaign, "general:claimed")
    assert claimed == SHARDS
    # Every shard took its part: the sums are of six shards' pieces, not one shard's.
    for keys in layout.keys:
        counts = await cluster_client.hmget(
            keys.budget(sales_campaign), ["fridge:reserved", "fridge:spent", "fridge:refunded"]
        )
        assert sum(int(count or 0) for count in counts) == SUBSIDY_FEN

    on_cluster = await watched(world, world.cluster, GOVERNMENT)
    sold = figures(on_cluster, sales_campaign, "fridge")
    assert (sold["reserved_fen"], sold["spent_fen"], sold["refunded_fen"]) == (
        sums["reserved"],
        sums["spent"],
        sums["refunded"],
    )
    assert sold["budget_fen"] == 2 * SHARDS * SUBSIDY_FEN
    assert sold["remaining_fen"] == (2 * SHARDS - 5) * SUBSIDY_FEN
    assert figures(on_cluster, quota_campaign, "general")["qualifications_claimed"] == claimed
    on_one_redis = await watched(world, world.one_redis, GOVERNMENT)
    for campaign_id, category in ((sales_campaign, "fridge"), (quota_campaign, "general")):
        assert figures(on_cluster, campaign_id, category) == figures(on_one_redis, campaign_id, category)
    operator_view = await watched(world, world.cluster, OPERATOR)
    assert figures(operator_view, sales_campaign, "fridge") == sold
    async with world.supervision(world.cluster, TERMINAL) as client:
        with pytest.raises(PermissionDenied):
            await anext(client.watch())
        with pytest.raises(PermissionDenied):
            await client.alerts()

    # The reader itself: the used fields summed, the shards' funding fields left out.
    reader = ShardedBudgetReader(cluster_client, layout.keys)
    try:
        counters = await reader.read([sales_campaign, quota_campaign])
    finally:
        await reader.aclose()
    assert counters.category(f"{sales_campaign}:fridge").spent_fen == 2 * SUBSIDY_FEN
    assert counters.category(f"{quota_campaign}:general").qualifications_claimed == SHARDS
    assert not [name for name in (*counters.budget, *counters.quota) if name.rsplit(":", 1)[-1] in SHARD_FUNDING_FIELDS]
    assert counters.as_of_ms > 0


async def test_reports_and_reconciliation_answer_on_the_cluster_as_on_one_redis(world: World) -> None:
    """An operator publishes the closed days and imports a day's settlement file through the
    cluster gateway; government credentials read the same reports and runs there as through the
    one-Redis gateway; a terminal cannot read, the government cannot publish or import."""
    day = world.days[-1].isoformat()
    async with world.reports(world.cluster, OPERATOR) as operator:
        published = await operator.publish(day)
    assert [header.business_date for header in published.published][-2:] == [d.isoformat() for d in world.days]
    async with (
        world.reports(world.cluster, GOVERNMENT) as on_cluster,
        world.reports(world.one_redis, GOVERNMENT) as on_one_redis,
    ):
        listed = await on_cluster.list()
        assert listed == await on_one_redis.list() and len(listed) == 2
        streamed = [part async for part in on_cluster.stream(day)]
        assert streamed == [part async for part in on_one_redis.stream(day)]
        assert streamed[0].header.content_hash == listed[0].content_hash
        with pytest.raises(PermissionDenied):
            await on_cluster.publish(day)
    async with world.reports(world.cluster, TERMINAL) as terminal:
        with pytest.raises(PermissionDenied):
            await terminal.list()

    items = await day_items(world.env, world.days[0])
    assert items
    settlement = encode(numbered(mirrored(items)))
    async with world.reconciliation(world.cluster, OPERATOR) as operator:
        imported = await operator.import_file(
            io.BytesIO(settlement),
            channel=CHANNEL,
            business_date=world.days[0].isoformat(),
            file_name="settlement.csv",
        )
    assert imported.applied and list(imported.errors) == []
    assert imported.run.exception_lines == 0 and imported.run.ledger_items == len(items)
    async with (
        world.reconciliation(world.cluster, GOVERNMENT) as on_cluster_recon,
        world.reconciliation(world.one_redis, GOVERNMENT) as on_one_redis_recon,
    ):
        runs = await on_cluster_recon.list(channel=CHANNEL)
        assert [run.run_id for run in runs] == [imported.run.run_id]
        assert runs == await on_one_redis_recon.list(channel=CHANNEL)
        lines = [part async for part in on_cluster_recon.results(imported.run.run_id, include_matched=True)]
        assert {line.status for part in lines[1:] for line in part.lines} == {rpb.RECONCILIATION_STATUS_MATCHED}
        with pytest.raises(PermissionDenied):
            await on_cluster_recon.import_file(
                io.BytesIO(settlement),
                channel=CHANNEL,
                business_date=world.days[0].isoformat(),
                file_name="settlement.csv",
            )


async def test_what_stays_unregistered_is_refused_unimplemented_and_health_names_the_rest(world: World) -> None:
    """The services that read or publish through one Redis's keys answer UNIMPLEMENTED from gRPC
    itself; health says SERVING for every registered service (the bureau's included) and
    NOT_FOUND for the others; reflection lists exactly the registered ones."""
    unregistered = [
        (campaign_pb2_grpc.CampaignServiceStub, "GetCampaign", campaign_pb2.GetCampaignRequest()),
        (catalog_pb2_grpc.CatalogServiceStub, "GetProduct", catalog_pb2.GetProductRequest()),
        (merchant_pb2_grpc.MerchantServiceStub, "GetMerchant", merchant_pb2.GetMerchantRequest()),
        (blocklist_pb2_grpc.BlockListServiceStub, "ListBlocks", blocklist_pb2.ListBlocksRequest()),
        (reporting_pb2_grpc.ReportingServiceStub, "GetLedgerStatus", reporting_pb2.GetLedgerStatusRequest()),
        (exchange_pb2_grpc.ExchangeServiceStub, "CheckConsumer", exchange_pb2.CheckConsumerRequest()),
        (
            credentials_pb2_grpc.CredentialServiceStub,
            "SetCredentialStatus",
            credentials_pb2.SetCredentialStatusRequest(),
        ),
        (complaints_pb2_grpc.ComplaintServiceStub, "GetTicket", complaints_pb2.GetTicketRequest()),
        (risk_pb2_grpc.RiskCaseServiceStub, "GetRiskCase", risk_pb2.GetRiskCaseRequest()),
    ]
    async with grpc.aio.insecure_channel(world.cluster) as channel:
        for stub, method, request in unregistered:
            with pytest.raises(grpc.aio.AioRpcError) as unserved:
                await getattr(stub(channel), method)(request)
            assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
        health = health_pb2_grpc.HealthStub(channel)
        for name in SHARDED_SERVICE_NAMES:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="subsidy.v1.CampaignService"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in reflection.ServerReflectionInfo(iter([request])):
            names = {service.name for service in response.list_services_response.service}
            break
    assert names == {*SHARDED_SERVICE_NAMES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert {
        "subsidy.v1.DailyReportService",
        "subsidy.v1.ReconciliationService",
        "subsidy.v1.SupervisionService",
    } <= names


async def test_the_fund_view_reads_on_after_a_failover(
    world: World, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    """Shard 0's primary fails over (its replica promoted, the old primary back as a replica):
    the next reads, the gateway's WatchFunds and a reader holding the old slot map, are
    redirected, read again with a fresh map and show the same sums as before. (Last in the
    module: the cluster's primaries have moved.)"""
    layout = ShardLayout(world.config.redis_prefix, SHARDS)
    campaign_id = await published_sales(world.env, world.config, sales=2 * SHARDS)
    await sell(world.cluster, world.credentials[TERMINAL], campaign_id, consumers_per_shard(layout, 1))
    before = figures(await watched(world, world.cluster, GOVERNMENT), campaign_id, "fridge")
    assert (before["reserved_fen"], before["spent_fen"]) == (3 * SUBSIDY_FEN, 2 * SUBSIDY_FEN)
    reader = ShardedBudgetReader(cluster_client, layout.keys, deadline_s=30.0)
    try:
        read_before = await reader.read([campaign_id])
        primary, replica = cluster_fixtures.lose_the_replication_link(redis_cluster, layout.keys[0].holds)
        await cluster_fixtures.fail_over(redis_cluster, layout.keys[0].holds, primary, replica)
        read_after = await reader.read([campaign_id])
    finally:
        await reader.aclose()
    assert reader.retried >= 1
    assert (read_after.budget, read_after.quota) == (read_before.budget, read_before.quota)
    assert figures(await watched(world, world.cluster, GOVERNMENT), campaign_id, "fridge") == before
