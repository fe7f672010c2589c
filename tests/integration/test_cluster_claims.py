"""Qualifications on a Redis Cluster deployment (issue 16, docs/scale-out.md 2.0): the gateway's
QualificationService claims in the claimant's consumer shard against that shard's slice of the
quota, and draws each redemption code to name that shard, so a sale by the code alone, a read and
a cancel find the owner's shard from the code; the quota over all shards is never exceeded, from
several client processes at once; each shard's sweeper expires its own qualifications."""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from redis.asyncio.cluster import RedisCluster
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy
from subsidy_client.v1 import authorization_pb2 as apb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

from server.config import Config
from storage.cluster_dev import LocalCluster
from storage.redis.cluster.shards import ShardLayout
from tests.conftest import Environment, consumer_key_of, id_number, running_gateway
from tests.integration import cluster_fixtures
from tests.integration.test_cluster_gateway import SHARDS, cluster_config, publish_document

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client

GOODS = "6970000000086"  # category general
PRICE_FEN, OFF_FEN = 3_000, 500  # a FIXED 500 off a purchase of 20 yuan or more
XIAOSHAN_GOVERNMENT = (30.18, 120.26)
ROUNDS_FOR_S = 30.0
SWEEP_INTERVAL_MS = 200  # the sweepers and the keeper: passes within a test's rounds


@pytest.fixture
async def cluster_gateway(environment: Environment, redis_cluster: LocalCluster) -> AsyncIterator[tuple[Config, str]]:
    """A cluster gateway whose sweepers (expiry per shard, the keeper) run every 200 ms."""
    config = replace(
        cluster_config(environment, redis_cluster, "cq" + secrets.token_hex(4)), sweep_interval_ms=SWEEP_INTERVAL_MS
    )
    async with running_gateway(config) as application:
        yield config, f"127.0.0.1:{application.port}"


def claim_document(campaign_id: str, quota: int, validity_s: int = 3600) -> dict[str, object]:
    return {
        "campaigns": [
            {
                "id": campaign_id,
                "starts_at": "2020-01-01T00:00:00+00:00",
                "ends_at": "2099-01-01T00:00:00+00:00",
                "qualification_validity_s": validity_s,
                "refund_policy": "RESTORE_ON_FULL_REFUND",
                "location_max_accuracy_m": 200,
                "location_max_age_s": 300,
                "rules": [
                    {
                        "category": "general",
                        "kind": "FIXED",
                        "threshold_fen": 2_000,
                        "off_fen": OFF_FEN,
                        "per_person_limit": 1,
                        "budget_fen": 100_000_000,
                        "qualification_quota": quota,
                    }
                ],
            }
        ]
    }


async def published(environment: Environment, config: Config, quota: int, validity_s: int = 3600) -> str:
    campaign_id = "c-clq-" + secrets.token_hex(4)
    await publish_document(environment, config, claim_document(campaign_id, quota, validity_s))
    return campaign_id


def here() -> common_pb2.Location:
    return common_pb2.Location(
        latitude=XIAOSHAN_GOVERNMENT[0],
        longitude=XIAOSHAN_GOVERNMENT[1],
        accuracy_m=20.0,
        coordinate_system=common_pb2.COORDINATE_SYSTEM_WGS84,
    )


def people_per_shard(layout: ShardLayout, count: int) -> list[str]:
    """``count`` ID numbers whose consumer keys fall in each shard, shard by shard."""
    found: dict[int, list[str]] = {shard: [] for shard in range(layout.count)}
    while any(len(people) < count for people in found.values()):
        person = id_number()
        shard = layout.shard_of_consumer(consumer_key_of(person))
        if len(found[shard]) < count:
            found[shard].append(person)
    return [person for people in found.values() for person in people]


async def claim(wallet: QualificationClient, campaign_id: str, person: str) -> qpb.ClaimQualificationResponse:
    return await wallet.claim(
        campaign_id=campaign_id,
        category="general",
        id_number=person,
        location=here(),
        fix_time_ms=int(time.time() * 1000),
    )


async def claimed_per_shard(cluster: RedisCluster, layout: ShardLayout, campaign_id: str) -> list[int]:
    return [
        int(await cluster.hget(keys.qualification_quota(campaign_id), "general:claimed") or 0) for keys in layout.keys
    ]


async def claim_rounds(
    claim_once: Callable[[str], Awaitable[qpb.ClaimQualificationResponse]],
    people: list[str],
    quota: int,
    cluster: RedisCluster,
    layout: ShardLayout,
    campaign_id: str,
) -> dict[str, str]:
    """Everyone without a code claims again, round after round (the keeper moving quota to the
    shards that ran out in between), until the whole quota is issued or the time is up; never
    more than the quota at any round. Returns person -> code."""
    codes: dict[str, str] = {}
    deadline = time.monotonic() + ROUNDS_FOR_S
    while len(codes) < quota and time.monotonic() < deadline:
        waiting = [person for person in people if person not in codes]
        answers = await asyncio.gather(*(claim_once(person) for person in waiting))
        for person, response in zip(waiting, answers, strict=True):
            if response.decision == qpb.CLAIM_DECISION_ISSUED:
                codes[person] = response.qualification.redemption_code
        assert len(codes) <= quota
        assert sum(await claimed_per_shard(cluster, layout, campaign_id)) == len(codes)
        await asyncio.sleep(0.2)
    return codes


async def test_claims_and_sales_by_code_in_the_owners_shard(
    environment: Environment, cluster_gateway: tuple[Config, str], cluster_client: RedisCluster
) -> None:
    """A quota of 12 over 6 shards (2 a shard), 3 people a shard claiming: exactly 12 issued,
    nobody twice; each code names
    its owner's shard; a sale by the code alone is approved in that shard and reserves it, a
    capture redeems it; another shard's consumer paying with it is declined
    QUALIFICATION_NOT_FOUND; a cancel returns its quota in its shard; Get and List find it."""
    config, target = cluster_gateway
    layout = ShardLayout(config.redis_prefix, SHARDS)
    quota = 2 * SHARDS
    campaign_id = await published(environment, config, quota)
    people = people_per_shard(layout, 3)
    retry = RetryPolicy(max_attempts=1)
    async with (
        QualificationClient(target, "p-wallet-01", environment.credentials["p-wallet-01"], retry=retry) as wallet,
        AuthorizationClient(target, "t-main-01", environment.credentials["t-main-01"], retry=retry) as till,
    ):
        codes = await claim_rounds(
            lambda person: claim(wallet, campaign_id, person), people, quota, cluster_client, layout, campaign_id
        )
        assert len(codes) == quota and len(set(codes.values())) == quota
        for person, code in codes.items():
            assert layout.shard_of_id(code) == layout.shard_of_consumer(consumer_key_of(person))
        # Nobody twice: a second claim of a holder is declined by the limit, in their shard.
        holder, code = next(iter(codes.items()))
        again = await claim(wallet, campaign_id, holder)
        assert again.decision == qpb.CLAIM_DECISION_DECLINED
        assert again.decline_reason == qpb.CLAIM_DECLINE_REASON_PERSON_LIMIT_REACHED
        assert [q.redemption_code for q in await wallet.list(holder, campaign_id)] == [code]

        # The till sends the code alone (with the phone's location, judged from the campaign's
        # rule read from a shard): the code's shard is its owner's.
        phone = qpb.DeviceLocation(location=here())
        phone.fix_time.FromMilliseconds(int(time.time() * 1000))
        sale = await till.authorize(
            campaign_id=campaign_id, redemption_code=code, lines=[Line("1", GOODS, PRICE_FEN)], consumer_location=phone
        )
        assert sale.decision == apb.DECISION_APPROVED and sale.subsidy_fen == OFF_FEN
        assert layout.shard_of_id(sale.authorization_id) == layout.shard_of_id(code)
        held = await wallet.get(code)
        assert held.state == qpb.QUALIFICATION_STATE_RESERVED and held.authorization_id == sale.authorization_id
        await till.capture(sale.authorization_id)
        assert (await wallet.get(code)).state == qpb.QUALIFICATION_STATE_REDEEMED

        # Someone of another shard paying with somebody else's code: not theirs, not found.
        owner, other_code = next((p, c) for p, c in codes.items() if p != holder)
        stranger = next(
            p for p in people if layout.shard_of_consumer(consumer_key_of(p)) != layout.shard_of_id(other_code)
        )
        wrong = await till.authorize(
            campaign_id=campaign_id,
            consumer_key=consumer_key_of(stranger),
            redemption_code=other_code,
            lines=[Line("1", GOODS, PRICE_FEN)],
        )
        assert wrong.decision == apb.DECISION_DECLINED
        assert wrong.decline_reason == apb.DECLINE_REASON_QUALIFICATION_NOT_FOUND

        # A cancel returns the quota in the code's shard, once.
        shard = layout.shard_of_id(other_code)
        before = (await claimed_per_shard(cluster_client, layout, campaign_id))[shard]
        cancelled = await wallet.cancel(other_code)
        assert cancelled.qualification.state == qpb.QUALIFICATION_STATE_CANCELLED
        assert (await claimed_per_shard(cluster_client, layout, campaign_id))[shard] == before - 1
        assert [q.state for q in await wallet.list(owner, campaign_id)] == [qpb.QUALIFICATION_STATE_CANCELLED]


async def test_each_shard_expires_its_own_qualifications(
    environment: Environment, cluster_gateway: tuple[Config, str], cluster_client: RedisCluster
) -> None:
    """A validity of one second: every shard's sweeper expires its qualifications and gives their
    quota back in that shard."""
    config, target = cluster_gateway
    layout = ShardLayout(config.redis_prefix, SHARDS)
    campaign_id = await published(environment, config, 2 * SHARDS, validity_s=1)
    async with QualificationClient(
        target, "p-wallet-01", environment.credentials["p-wallet-01"], retry=RetryPolicy(max_attempts=1)
    ) as wallet:
        codes = [
            (await claim(wallet, campaign_id, person)).qualification.redemption_code
            for person in people_per_shard(layout, 1)
        ]
        assert all(codes) and {layout.shard_of_id(code) for code in codes} == set(range(SHARDS))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = {(await wallet.get(code)).state for code in codes}
            if states == {qpb.QUALIFICATION_STATE_EXPIRED}:
                break
            await asyncio.sleep(0.2)
        assert states == {qpb.QUALIFICATION_STATE_EXPIRED}
    assert await claimed_per_shard(cluster_client, layout, campaign_id) == [0] * SHARDS


def _claimer(target: str, secret: str, campaign_id: str, people: list[str], results: multiprocessing.Queue) -> None:
    """A client process: each of ``people`` claims once (one attempt), all at once; puts
    [(person, code or "")]."""

    async def main() -> list[tuple[str, str]]:
        async with QualificationClient(target, "p-wallet-01", secret, retry=RetryPolicy(max_attempts=1)) as wallet:
            answers = await asyncio.gather(
                *(claim(wallet, campaign_id, person) for person in people), return_exceptions=True
            )
        return [
            (person, answer.qualification.redemption_code if not isinstance(answer, BaseException) else "")
            for person, answer in zip(people, answers, strict=True)
        ]

    results.put(asyncio.run(main()))


@pytest.mark.slow
async def test_a_crowd_from_three_processes_never_gets_more_than_the_quota(
    environment: Environment, cluster_gateway: tuple[Config, str], cluster_client: RedisCluster
) -> None:
    """A quota of 30 over 6 shards (5 a shard) and 132 people: 2 in each shard and 120 more in
    shards 0 and 1 (a crowd hashed unevenly). Three client processes claim at once, round after
    round for those still without a code, until three rounds in a row issue nothing. Never
    more than 30 issued at any round; the crowded shards issue more than their slice of 10 (the
    keeper moves the quiet shards' unused quota there, aiming at the even level, so fewer than
    one a shard may stay unused in the quiet shards: docs/scale-out.md); every code a different
    person's, in its owner's shard; the shards' claimed counts add up to the codes issued."""
    config, target = cluster_gateway
    layout = ShardLayout(config.redis_prefix, SHARDS)
    quota = 30
    campaign_id = await published(environment, config, quota)
    quiet = people_per_shard(layout, 2)
    crowded = [
        person
        for person in (id_number() for _ in range(2_000))
        if layout.shard_of_consumer(consumer_key_of(person)) < 2
    ][:120]
    people = quiet + crowded
    context = multiprocessing.get_context("spawn")
    secret = environment.credentials["p-wallet-01"]
    codes: dict[str, str] = {}
    deadline = time.monotonic() + 3 * ROUNDS_FOR_S
    idle_rounds = rounds = 0
    while len(codes) < quota and idle_rounds < 3 and time.monotonic() < deadline:
        waiting = [person for person in people if person not in codes]
        results: multiprocessing.Queue[list[tuple[str, str]]] = context.Queue()
        workers = [
            context.Process(target=_claimer, args=(target, secret, campaign_id, waiting[index::3], results))
            for index in range(3)
        ]
        for worker in workers:
            worker.start()
        answers = [answer for _ in workers for answer in await asyncio.to_thread(results.get, True, 120)]
        for worker in workers:
            worker.join(30)
        rounds += 1
        issued_before = len(codes)
        for person, code in answers:
            if code:
                assert person not in codes
                codes[person] = code
        idle_rounds = idle_rounds + 1 if len(codes) == issued_before else 0
        assert len(codes) <= quota
        assert sum(await claimed_per_shard(cluster_client, layout, campaign_id)) == len(codes)
        await asyncio.sleep(3 * SWEEP_INTERVAL_MS / 1000)  # a few keeper passes
    assert len(set(codes.values())) == len(codes)
    for person, code in codes.items():
        assert layout.shard_of_id(code) == layout.shard_of_consumer(consumer_key_of(person))
    per_shard = Counter(layout.shard_of_id(code) for code in codes.values())
    assert [per_shard[shard] for shard in range(2, SHARDS)] == [2] * (SHARDS - 2)  # everyone there
    assert per_shard[0] + per_shard[1] > 2 * (quota // SHARDS), f"{per_shard} after {rounds} rounds"
    assert quota - len(codes) < SHARDS, f"{len(codes)} issued after {rounds} rounds"
