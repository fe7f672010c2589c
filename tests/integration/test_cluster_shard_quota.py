"""A campaign's qualification quota over the consumer shards of a cluster deployment
(storage/redis/cluster/shard_budget.py ShardQuota, keeper.py, issue 16) on the real six-node
local cluster: each shard funded its slice of the released quota (a category's and a voucher
pack's), and the unchanged claim script run in each shard's key set issuing at most that slice
(claim_qualification.lua: the smaller of the released quota and the shard's ``:total``); a later
tranche funds more; transfers move quota and never create it, and write nothing to the budget's
money stream; Σ issued never exceeds the released quota under claims from several processes;
the publication records and funds the plans; a key set with no slice claims as one Redis does."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from server.commands.reference import publish_snapshot, quota_plans
from server.config import Config
from storage.cluster_dev import LocalCluster
from storage.postgres.reference import ReferenceSnapshot
from storage.redis.cluster.escrow import EscrowError, split
from storage.redis.cluster.keeper import (
    Plan,
    QuotaPlan,
    keep,
    plans_key,
    read_plans,
    read_quota_plans,
    record_quota_plans,
)
from storage.redis.cluster.shard_budget import ShardBudget, ShardBudgetAudit, ShardQuota, ShardQuotaSlice
from storage.redis.cluster.shards import ShardLayout, publish_to_shards
from storage.redis.contract import CLAIM_DECLINE_REASONS, ClaimAnswer, Failure, Issued, Reply, VoucherArgs
from storage.redis.scripts import Scripts
from storage.redis.store import CancelInput, ClaimInput, RedisStore, StoreLimits
from tests.integration import cluster_fixtures

redis_cluster = cluster_fixtures.redis_cluster  # the module's fixture
cluster_client = cluster_fixtures.cluster_client

SHARDS = 6
CAMPAIGN, CATEGORY, PACK_CATEGORY, PACK = "c-quota", "fridge", "tv", "duo"
PACK_FIELD = f"pack:{PACK}"
PARTNER = "p-quota"
LIMITS = StoreLimits(hold_ttl_s=600, idempotency_ttl_s=86_400, nonce_ttl_s=600, programme_timezone="Asia/Shanghai")
ISSUED = "ISSUED"
QUOTA_EXHAUSTED = CLAIM_DECLINE_REASONS["QUOTA_EXHAUSTED"]
NOT_YET_RELEASED = CLAIM_DECLINE_REASONS["NOT_YET_RELEASED"]


def new_layout() -> ShardLayout:
    return ShardLayout("sq" + os.urandom(4).hex(), SHARDS)


def _at(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def snapshot(quota: int, tranches: Sequence[tuple[int, int]] = (), pack_quota: int = 6) -> ReferenceSnapshot:
    """One active campaign issuing qualifications: ``fridge`` claimed by category (``quota``,
    tranches as (release ms, count of that tranche)), ``tv`` only in the pack ``duo``."""
    now = datetime.now(UTC)

    def rule(category: str, qualification_quota: int, released: list[tuple[int, int]]) -> dict[str, Any]:
        return {
            "campaign_id": CAMPAIGN,
            "category": category,
            "kind": "FIXED",
            "rates_bp": {},
            "cap_fen": 0,
            "threshold_fen": 2_000,
            "off_fen": 500,
            "price_ceiling_fen": 0,
            "per_person_limit": 1,
            "budget_fen": 100_000_000,
            "tranches": [],
            "qualification_quota": qualification_quota,
            "qualification_tranches": [{"release_at": _at(ms), "count": count} for ms, count in released],
        }

    return ReferenceSnapshot(
        campaigns=[
            {
                "campaign_id": CAMPAIGN,
                "status": "ACTIVE",
                "starts_at": now - timedelta(days=1),
                "ends_at": now + timedelta(days=30),
                "qualification_validity_s": 3600,
                "refund_policy": "RESTORE_ON_FULL_REFUND",
            }
        ],
        rules=[rule(CATEGORY, quota, list(tranches)), rule(PACK_CATEGORY, 1_000, [])],
        products=[],
        merchants=[],
        terminals=[],
        operators=[],
        partners=[],
        packs={
            CAMPAIGN: [
                {
                    "pack_id": PACK,
                    "vouchers": [{"category": PACK_CATEGORY, "threshold_fen": 1_000, "off_fen": 100}],
                    "quota": pack_quota,
                    "tranches": [],
                }
            ]
        },
    )


def consumers_of(layout: ShardLayout, per_shard: int) -> dict[int, list[str]]:
    """``per_shard`` new consumer keys hashing to each shard."""
    found: dict[int, list[str]] = {shard: [] for shard in range(layout.count)}
    while any(len(keys) < per_shard for keys in found.values()):
        key = os.urandom(16).hex()
        shard = layout.shard_of_consumer(key)
        if len(found[shard]) < per_shard:
            found[shard].append(key)
    return found


def claim_input(consumer: str, pack: bool = False) -> ClaimInput:
    return ClaimInput(
        payload_hash=os.urandom(32).hex(),
        request_id=str(uuid.uuid4()),
        partner_id=PARTNER,
        nonce=os.urandom(12).hex(),
        campaign_id=CAMPAIGN,
        category="" if pack else CATEGORY,
        consumer_key=consumer,
        redemption_code=os.urandom(10).hex(),
        location_verdict=0,
        masked_id_number="",
        masked_phone_number="",
        location_cell="",
        pack_id=PACK if pack else "",
        vouchers=[VoucherArgs(os.urandom(10).hex(), "", "")] if pack else (),
    )


def outcome(reply: Reply[ClaimAnswer]) -> str | int:
    """ISSUED, or the decline reason's number; a refusal fails the test."""
    assert not isinstance(reply, Failure), reply
    return ISSUED if isinstance(reply.body, Issued) else reply.body.reason


class Shards:
    """The unchanged claim script in each shard's key set (RedisStore.claim over the cluster client,
    as ShardedStore routes a claim to its claimant's shard)."""

    def __init__(self, client: RedisCluster, layout: ShardLayout) -> None:
        self.layout = layout
        self.scripts = Scripts(client)  # type: ignore[arg-type]
        self.stores = [RedisStore(client, keys, self.scripts, LIMITS) for keys in layout.keys]  # type: ignore[arg-type]

    async def claim(self, consumer: str, pack: bool = False) -> str | int:
        store = self.stores[self.layout.shard_of_consumer(consumer)]
        return outcome(await store.claim(claim_input(consumer, pack)))

    async def claim_code(self, consumer: str) -> str:
        """A claim expected to issue: its redemption code."""
        reply = await self.stores[self.layout.shard_of_consumer(consumer)].claim(claim_input(consumer))
        assert not isinstance(reply, Failure) and isinstance(reply.body, Issued), reply
        return reply.body.qualification.redemption_code


@pytest.fixture
async def world(cluster_client: RedisCluster) -> AsyncIterator[tuple[Shards, ShardQuota]]:
    """A new deployment's shards with the campaign published (quota 12: 2 a shard once funded,
    nothing funded yet), its claim path and its quota."""
    layout = new_layout()
    await publish_to_shards(cluster_client, layout, snapshot(quota=12))
    shards = Shards(cluster_client, layout)
    await shards.scripts.preload()
    budget = ShardBudget(cluster_client, layout)
    try:
        yield shards, budget.quota
    finally:
        await budget.aclose()


def _assert_sound(audit: ShardBudgetAudit[ShardQuotaSlice]) -> None:
    assert audit.conserved, (audit.total, audit.in_flight, audit.funded)
    assert audit.within_budget, (audit.used, audit.funded)


async def _money_events(budget: ShardBudget, campaign_id: str) -> list[dict[str, str]]:
    """Every entry of the shards' budget streams (the ledger's input) naming the campaign."""
    found = []
    for shard in range(SHARDS):
        client = await budget._nodes.for_key(budget.ledger_key(shard))
        for _, fields in await client.xrange(budget.ledger_key(shard)):
            event = {k.decode(): v.decode() for k, v in fields.items()}
            if event.get("campaign") == campaign_id:
                found.append(event)
    return found


# --------------------------------------------------------------------------- funding and claims


async def test_the_quota_keys_share_the_shards_slot(
    world: tuple[Shards, ShardQuota], redis_cluster: LocalCluster
) -> None:
    _, quota = world
    for shard in range(SHARDS):
        keys = [
            quota.quota_key(shard, CAMPAIGN),
            quota.transfers_key(shard, CAMPAIGN),
            quota.open_key(shard, CAMPAIGN),
            quota.credited_key(shard, CAMPAIGN),
            quota.replays_key(shard),
            quota.layout.keys[shard].qualification_holder(CAMPAIGN, "someone"),  # what the claim reads beside it
        ]
        assert len({redis_cluster.slot_of(key) for key in keys}) == 1
    # Its own transfer records: a budget's sweep or audit never meets a quota transfer.
    budget = ShardBudget(quota.cluster, quota.layout)
    assert quota.transfers_key(0, CAMPAIGN) != budget.transfers_key(0, CAMPAIGN)
    assert quota.open_key(0, CAMPAIGN) != budget.open_key(0, CAMPAIGN)
    assert quota.credited_key(0, CAMPAIGN) != budget.credited_key(0, CAMPAIGN)


@pytest.mark.parametrize("funded", [0, 1, SHARDS - 1, 12, 13])
async def test_each_shard_issues_at_most_its_slice(world: tuple[Shards, ShardQuota], funded: int) -> None:
    """Funded 0, 1, 5, the quota (12: 2 a shard) or one more: three claims in every shard (18
    against a quota of 12); each shard issues exactly its slice, the rest are declined
    QUOTA_EXHAUSTED (not NOT_YET_RELEASED: the quota is released, the shard's slice is used).
    A shard cannot see the others: Σ issued is Σ funded, so what bounds it is the funding, which
    the publication and the keeper compute from the released quota (13 is more than any of them
    funds: shard 0's 3 are still within the released 12, so the script issues them)."""
    shards, quota = world
    assert await quota.fund(CAMPAIGN, CATEGORY, funded) == split(funded, SHARDS)
    states = await quota.read(CAMPAIGN, CATEGORY)
    assert [s.total for s in states] == [s.funded for s in states] == [s.available for s in states]
    assert [s.total for s in states] == split(funded, SHARDS)
    people = consumers_of(shards.layout, 3)
    for shard in range(SHARDS):
        answers = [await shards.claim(person) for person in people[shard]]
        slice_ = split(funded, SHARDS)[shard]
        assert answers == [ISSUED] * slice_ + [QUOTA_EXHAUSTED] * (3 - slice_)
    states = await quota.read(CAMPAIGN, CATEGORY)
    assert [s.claimed for s in states] == split(funded, SHARDS)
    assert all(s.available == 0 for s in states)
    audit = await quota.audit(CAMPAIGN, CATEGORY)
    assert audit.used == funded
    _assert_sound(audit)


async def test_a_shard_funded_ahead_of_the_schedule_issues_only_what_is_released(cluster_client: RedisCluster) -> None:
    """The script takes the smaller of the two: a shard holding more than the schedule has
    released (a keeper that funded a tranche a moment early, a quota lowered since) issues no more
    than the released quota; nothing released yet is still NOT_YET_RELEASED."""
    layout = new_layout()
    start = now_ms()
    await publish_to_shards(cluster_client, layout, snapshot(60, [(start - 60_000, 2), (start + 3_600_000, 58)]))
    shards = Shards(cluster_client, layout)
    await shards.scripts.preload()
    budget = ShardBudget(cluster_client, layout)
    try:
        await budget.quota.fund(CAMPAIGN, CATEGORY, 60)  # 10 a shard; 2 released
        people = consumers_of(layout, 4)[0]
        assert [await shards.claim(person) for person in people] == [ISSUED, ISSUED] + [QUOTA_EXHAUSTED] * 2
    finally:
        await budget.aclose()
    later = new_layout()
    await publish_to_shards(cluster_client, later, snapshot(60, [(start + 3_600_000, 60)]))
    shards = Shards(cluster_client, later)
    await shards.scripts.preload()
    budget = ShardBudget(cluster_client, later)
    try:
        await budget.quota.fund(CAMPAIGN, CATEGORY, 60)
        assert await shards.claim(consumers_of(later, 1)[0][0]) == NOT_YET_RELEASED
    finally:
        await budget.aclose()


async def test_a_pack_is_issued_from_its_shards_slice_of_the_pack_quota(world: tuple[Shards, ShardQuota]) -> None:
    """The pack quota (6 packs: 1 a shard) is kept under pack:<id>, like a category's."""
    shards, quota = world
    await quota.fund(CAMPAIGN, PACK_FIELD, 6)
    people = consumers_of(shards.layout, 2)[0]
    assert [await shards.claim(person, pack=True) for person in people] == [ISSUED, QUOTA_EXHAUSTED]
    assert (await quota.transfer(CAMPAIGN, PACK_FIELD, 1, 0, 1)).amount == 1
    assert await shards.claim(people[1], pack=True) == ISSUED
    states = await quota.read(CAMPAIGN, PACK_FIELD)
    assert [s.claimed for s in states] == [2, 0, 0, 0, 0, 0] and [s.total for s in states] == [2, 0, 1, 1, 1, 1]
    _assert_sound(await quota.audit(CAMPAIGN, PACK_FIELD))
    # The category's quota is another field of the same hash: untouched.
    assert [s.funded for s in await quota.read(CAMPAIGN, CATEGORY)] == [0] * SHARDS


async def test_a_key_set_without_a_slice_claims_as_one_redis_does(world: tuple[Shards, ShardQuota]) -> None:
    """No <category>:total in the quota hash (one Redis, where nothing funds it): the whole
    released quota, exactly as before the change."""
    shards, quota = world
    people = consumers_of(shards.layout, 13)[3]
    assert [await shards.claim(person) for person in people] == [ISSUED] * 12 + [QUOTA_EXHAUSTED]
    client = await quota._nodes.for_key(quota.quota_key(3, CAMPAIGN))
    assert await client.hgetall(quota.quota_key(3, CAMPAIGN)) == {f"{CATEGORY}:claimed".encode(): b"12"}


# --------------------------------------------------------------------------- transfers


async def test_a_transfer_moves_quota_and_never_creates_it(
    world: tuple[Shards, ShardQuota], cluster_client: RedisCluster
) -> None:
    shards, quota = world
    await quota.fund(CAMPAIGN, CATEGORY, 12)
    people = consumers_of(shards.layout, 6)
    codes = [await shards.claim_code(person) for person in people[1][:2]]
    assert await shards.claim(people[1][2]) == QUOTA_EXHAUSTED
    # Shard 1 has nothing left to lend: no record, nothing moved.
    assert (await quota.transfer(CAMPAIGN, CATEGORY, 1, 0, 5)).amount == 0
    # Shard 2 lends at most its available (2), however much is asked.
    assert (await quota.transfer(CAMPAIGN, CATEGORY, 2, 1, 5)).amount == 2
    assert [await shards.claim(person) for person in people[1][2:5]] == [ISSUED, ISSUED, QUOTA_EXHAUSTED]
    assert await shards.claim(people[2][0]) == QUOTA_EXHAUSTED
    audit = await quota.audit(CAMPAIGN, CATEGORY)
    assert [s.total for s in audit.shards] == [2, 4, 0, 2, 2, 2] and audit.total == audit.funded == 12
    _assert_sound(audit)
    # A cancelled qualification returns to its shard's pool (claimed down): lendable again.
    store = shards.stores[1]
    cancel = CancelInput(os.urandom(32).hex(), str(uuid.uuid4()), PARTNER, os.urandom(12).hex(), codes[0])
    assert not isinstance(await store.cancel_qualification(cancel), Failure)
    assert (await quota.read(CAMPAIGN, CATEGORY))[1].available == 1
    assert (await quota.transfer(CAMPAIGN, CATEGORY, 1, 2, 3)).amount == 1
    # A transfer left between debit and credit is in flight (nobody's to issue), then swept once.
    assert await quota.debit(CAMPAIGN, CATEGORY, 3, "t-crash", 2, 2) == 2
    audit = await quota.audit(CAMPAIGN, CATEGORY)
    assert audit.in_flight == 2 and audit.total == 10
    _assert_sound(audit)
    assert [(t.lender, t.borrower, t.amount) for t in await quota.sweep(CAMPAIGN)] == [(3, 2, 2)]
    assert await quota.sweep(CAMPAIGN) == []
    audit = await quota.audit(CAMPAIGN, CATEGORY)
    assert [s.total for s in audit.shards] == [2, 3, 3, 0, 2, 2] and audit.in_flight == 0
    assert audit.total == audit.funded == 12
    _assert_sound(audit)
    # Vouchers are no money: nothing in the shards' budget streams, which the ledger books.
    budget = ShardBudget(cluster_client, shards.layout)
    try:
        assert await _money_events(budget, CAMPAIGN) == []
        # ... and the budget of the same category never sees the quota's transfers.
        assert (await budget.audit(CAMPAIGN, CATEGORY)).open_transfers == {}
        assert await budget.sweep(CAMPAIGN) == []
    finally:
        await budget.aclose()


async def test_bad_quota_input_is_refused(world: tuple[Shards, ShardQuota]) -> None:
    _, quota = world
    for bad in (-1, 1.5, True):
        with pytest.raises(EscrowError, match="released"):
            await quota.fund(CAMPAIGN, CATEGORY, bad)  # type: ignore[arg-type]
    for bad_category in ("", "pack:", "pack:a b", "Fridge", "pack:x:y"):
        with pytest.raises(EscrowError, match="category"):
            await quota.fund(CAMPAIGN, bad_category, 1)
    with pytest.raises(EscrowError, match="NOT_FUNDED"):
        await quota.debit(CAMPAIGN, CATEGORY, 1, "t", 1, 0)
    # A budget keeps refusing a pack as its category.
    budget = ShardBudget(quota.cluster, quota.layout)
    with pytest.raises(EscrowError, match="category"):
        await budget.fund(CAMPAIGN, PACK_FIELD, 1)


# --------------------------------------------------------------------------- the keeper and the publication


async def test_a_later_tranche_funds_more_and_the_keeper_feeds_a_crowd(
    world: tuple[Shards, ShardQuota], cluster_client: RedisCluster
) -> None:
    """Both tranches are due by the script's clock, but a shard issues only what the keeper has
    funded: the first tranche (6: 1 a shard) until a pass sees the second (12: 2 a shard). Then a
    crowd in shard 0 alone gets more than its slice as the keeper rebalances quota to it."""
    shards, quota = world
    layout, start = shards.layout, now_ms()
    tranches = [[start - 60_000, 6], [start - 1_000, 12]]  # as published: cumulative
    await record_quota_plans(cluster_client, layout.control, [QuotaPlan(CAMPAIGN, CATEGORY, 12, tranches, 1)])
    budget = ShardBudget(cluster_client, layout)
    try:
        kept = await keep(budget, layout.control, now_ms=start - 30_000)
        assert (kept.quota_funded, kept.funded, kept.moved_fen) == (1, 0, 0)
        assert [s.total for s in await quota.read(CAMPAIGN, CATEGORY)] == [1] * SHARDS
        people = consumers_of(layout, 12)
        assert [await shards.claim(person) for person in people[0][:2]] == [ISSUED, QUOTA_EXHAUSTED]
        await keep(budget, layout.control, now_ms=start)
        assert [s.funded for s in await quota.read(CAMPAIGN, CATEGORY)] == [2] * SHARDS
        assert await shards.claim(people[0][1]) == ISSUED
        issued, moved = 2, 0
        # Shard 0 is empty, the others hold 2 each: each pass brings it up to the level (Σ
        # available // 6) from the richest, while that is at least one voucher.
        for person in people[0][2:]:
            if await shards.claim(person) != ISSUED:
                kept = await keep(budget, layout.control, now_ms=start)
                assert kept.moved_fen == 0
                moved += kept.moved_vouchers
                if await shards.claim(person) != ISSUED:
                    break
            issued += 1
        # 5 more than the shard's own 2; the last 5 stay one in each other shard (the level is 0
        # below 6 left), as a budget's last units do (docs/scale-out.md, the keeper).
        assert (issued, moved) == (7, 5)
        audit = await quota.audit(CAMPAIGN, CATEGORY)
        assert audit.funded == 12 and audit.used == issued
        assert [s.available for s in audit.shards] == [0, 1, 1, 1, 1, 1]
        _assert_sound(audit)
        assert await _money_events(budget, CAMPAIGN) == []
    finally:
        await budget.aclose()


async def test_the_publication_records_and_funds_every_quota(
    cluster_client: RedisCluster, redis_cluster: LocalCluster
) -> None:
    """publish_snapshot on a cluster: a quota plan for each rule with a quota and each pack, the
    shards funded their slices before the claim can issue anything; the budget plans as before,
    and a budget plan recorded without a version (an older publication's) still reads."""
    layout = new_layout()
    config = Config(
        redis_prefix=layout.prefix,
        redis_cluster_nodes=",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes),
        redis_shards=SHARDS,
    )
    published = snapshot(quota=30, pack_quota=7)
    version = await publish_snapshot(config, published)
    plans = sorted(await read_quota_plans(cluster_client, layout.control), key=lambda plan: plan.category)
    assert plans == [
        QuotaPlan(CAMPAIGN, CATEGORY, 30, [], version),
        QuotaPlan(CAMPAIGN, PACK_FIELD, 7, [], version),
        QuotaPlan(CAMPAIGN, PACK_CATEGORY, 1_000, [], version),
    ]
    assert quota_plans(published, version) == [plans[0], plans[2], plans[1]]
    assert {(plan.category, plan.budget_fen) for plan in await read_plans(cluster_client, layout.control)} == {
        (CATEGORY, 100_000_000),
        (PACK_CATEGORY, 100_000_000),
    }
    await cluster_client.hset(
        plans_key(layout.control), "c-old|fridge", b'{"budget_fen": 5, "tranches": [], "unit_fen": 1}'
    )
    assert Plan("c-old", "fridge", 5, [], 1, 0) in await read_plans(cluster_client, layout.control)
    budget = ShardBudget(cluster_client, layout)
    try:
        assert [s.total for s in await budget.quota.read(CAMPAIGN, CATEGORY)] == split(30, SHARDS)
        assert [s.total for s in await budget.quota.read(CAMPAIGN, PACK_FIELD)] == split(7, SHARDS)
        assert [s.total for s in await budget.read(CAMPAIGN, CATEGORY)] == split(100_000_000, SHARDS)
        shards = Shards(cluster_client, layout)
        await shards.scripts.preload()
        people = consumers_of(layout, 6)[5]
        assert [await shards.claim(person) for person in people] == [ISSUED] * 5 + [QUOTA_EXHAUSTED]
        # Published again with a smaller quota, 12, while shard 5 has issued 5: the even cut
        # (2 a shard) leaves shard 5 three below what it issued while the other five could still
        # issue 2 each, 15 in all; the publication's rebalance brings shard 5 back up from them,
        # so what can still be issued is exactly 12 - 5 (before it, 10).
        version = await publish_snapshot(config, snapshot(quota=12, pack_quota=7))
        slices = await budget.quota.read(CAMPAIGN, CATEGORY)
        assert sum(s.total for s in slices) == 12 and all(s.available >= 0 for s in slices), slices
        assert sum(s.available for s in slices) == 12 - 5
        _assert_sound(await budget.quota.audit(CAMPAIGN, CATEGORY))
        # A stale keeper's plans, recorded at the older version, move nothing.
        assert await budget.quota.fund(CAMPAIGN, CATEGORY, 30, version - 1) == split(30, SHARDS)
        assert await budget.quota.read(CAMPAIGN, CATEGORY) == slices
        # The money stream has the budget's two categories funded once a shard, nothing of the
        # quota's fundings (the same category, other amounts) nor of the pack.
        events = await _money_events(budget, CAMPAIGN)
        assert len(events) == 2 * SHARDS and {event["event"] for event in events} == {"SHARD_FUNDED"}
        assert {int(event["funded"]) for event in events} == set(split(100_000_000, SHARDS))
    finally:
        await budget.aclose()


# --------------------------------------------------------------------------- several processes


@dataclass(frozen=True)
class ClaimSpec:
    startup: list[tuple[str, int]]
    prefix: str
    consumers: list[str]
    tasks: int = 8


async def _claims(spec: ClaimSpec) -> list[tuple[str, str | int]]:
    client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in spec.startup])
    try:
        shards = Shards(client, ShardLayout(spec.prefix, SHARDS))
        await shards.scripts.preload()
        queue = list(spec.consumers)
        answers: list[tuple[str, str | int]] = []

        async def app() -> None:
            while queue:
                consumer = queue.pop()
                answers.append((consumer, await shards.claim(consumer)))

        await asyncio.gather(*(app() for _ in range(spec.tasks)))
        return answers
    finally:
        await client.aclose()


def run_claims(spec: ClaimSpec) -> list[tuple[str, str | int]]:
    """A process pool's entry point: each consumer claims once; (consumer, outcome)."""
    return asyncio.run(_claims(spec))


async def _from_processes(redis_cluster: LocalCluster, layout: ShardLayout, people: list[str]) -> list[str]:
    """Three processes claim at once, each consumer tried by two of them; the consumers issued."""
    parts = [people[worker::3] for worker in range(3)]
    specs = [ClaimSpec(redis_cluster.startup_nodes, layout.prefix, parts[w] + parts[(w + 1) % 3]) for w in range(3)]
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = await asyncio.gather(
            *(asyncio.get_running_loop().run_in_executor(pool, run_claims, spec) for spec in specs)
        )
    answers = [answer for result in results for answer in result]
    assert {result for _, result in answers} <= {ISSUED, QUOTA_EXHAUSTED, CLAIM_DECLINE_REASONS["PERSON_LIMIT_REACHED"]}
    issued = [consumer for consumer, result in answers if result == ISSUED]
    assert len(issued) == len(set(issued))  # nobody twice
    return issued


async def test_several_processes_issue_exactly_each_shards_slice(
    world: tuple[Shards, ShardQuota], redis_cluster: LocalCluster
) -> None:
    """Quota 12 (2 a shard), 5 consumers a shard each tried twice from three processes: exactly 2
    issued in each shard, 12 in all, where unsharded every shard would issue up to 12."""
    shards, quota = world
    await quota.fund(CAMPAIGN, CATEGORY, 12)
    people = [person for group in consumers_of(shards.layout, 5).values() for person in group]
    issued = await _from_processes(redis_cluster, shards.layout, people)
    assert Counter(shards.layout.shard_of_consumer(person) for person in issued) == {s: 2 for s in range(SHARDS)}
    audit = await quota.audit(CAMPAIGN, CATEGORY)
    assert audit.used == 12 and [s.claimed for s in audit.shards] == [2] * SHARDS
    _assert_sound(audit)


@pytest.mark.slow
async def test_issued_never_exceeds_the_released_quota_under_claims_and_transfers(
    cluster_client: RedisCluster, redis_cluster: LocalCluster
) -> None:
    """Quota 120 (20 a shard), 40 consumers a shard claiming from three processes while this
    process moves quota between random shards (some transfers abandoned after the debit, as a
    killed keeper would) and reads the whole cluster at single instants (writes paused): Σ total +
    F = Σ funded and Σ claimed ≤ Σ funded in each, Σ issued ≤ 120 throughout and after; each
    shard's claimed is what it issued."""
    layout = new_layout()
    await publish_to_shards(cluster_client, layout, snapshot(quota=120))
    budget = ShardBudget(cluster_client, layout)
    quota = budget.quota
    try:
        await quota.fund(CAMPAIGN, CATEGORY, 120)
        people = [person for group in consumers_of(layout, 40).values() for person in group]
        claiming = asyncio.create_task(_from_processes(redis_cluster, layout, people))
        snapshots: list[ShardBudgetAudit[ShardQuotaSlice]] = []
        rng = random.Random(16)
        while not claiming.done():
            lender, borrower = rng.sample(range(SHARDS), 2)
            if rng.random() < 0.1:
                await quota.debit(CAMPAIGN, CATEGORY, lender, uuid.uuid4().hex, rng.randint(1, 5), borrower)
            else:
                await quota.transfer(CAMPAIGN, CATEGORY, lender, borrower, rng.randint(1, 5))
            with redis_cluster.writes_paused():
                snapshots.append(await quota.audit(CAMPAIGN, CATEGORY))
            await asyncio.sleep(0.005)
        issued = await claiming
        assert len(snapshots) >= 3 and any(snapshot.used for snapshot in snapshots)
        for snapshot_ in snapshots:
            _assert_sound(snapshot_)
            assert snapshot_.funded == 120
        assert len(issued) <= 120
        await quota.sweep(CAMPAIGN)
        audit = await quota.audit(CAMPAIGN, CATEGORY)
        assert audit.in_flight == 0 and audit.total == 120 and audit.open_transfers == {}
        _assert_sound(audit)
        per_shard = Counter(layout.shard_of_consumer(person) for person in issued)
        assert [s.claimed for s in audit.shards] == [per_shard[shard] for shard in range(SHARDS)]
        assert all(s.claimed <= s.total for s in audit.shards)
        assert await _money_events(budget, CAMPAIGN) == []
    finally:
        await budget.aclose()
