"""A load process for the escrow budget tests (test_cluster_escrow.py): its own event loop and
cluster client, several concurrent callers reserving 1-fen units until declined.

Demand is skewed (``hot_share`` of the consumers hash to the first two shards), so the hot
shards run dry and must borrow. With ``abandon`` > 0 a borrower sometimes stops right after a
transfer's debit, as a gateway killed between the steps would, leaving the money in flight for
the sweeper. Every call that fails for a while (a primary killed, a replica not yet in sync) is
retried with the same reservation id until acknowledged.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field

from redis.asyncio.cluster import ClusterNode, RedisCluster

from storage.redis.cluster.escrow import EscrowBudget, EscrowUnavailable


@dataclass
class LoadResult:
    approved: list[tuple[int, str]] = field(default_factory=list)  # (shard, reservation id)
    declined: int = 0
    abandoned: int = 0  # transfers left debited, not credited
    unavailable: int = 0  # EscrowUnavailable seen (then retried)
    retried: dict[str, int] = field(default_factory=dict)  # EscrowBudget.retried: why steps were re-sent


@dataclass(frozen=True)
class LoadSpec:
    startup: list[tuple[str, int]]
    prefix: str
    campaign_id: str
    category: str
    shards: int
    worker: int
    tasks: int = 8
    hot_share: float = 0.7
    abandon: float = 0.0
    chunk: int = 5
    seed: int = 0
    # A worker stops here even without a decline, so a bug that approves past the budget fails
    # the test quickly instead of running until the pytest timeout.
    max_approvals: int = 1_000_000


def _pick_shard(spec: LoadSpec, rng: random.Random) -> int:
    if spec.shards > 2 and rng.random() < spec.hot_share:
        return rng.randrange(2)
    return rng.randrange(spec.shards)


async def _caller(spec: LoadSpec, escrow: EscrowBudget, task: int, result: LoadResult) -> None:
    rng = random.Random(spec.seed * 1000 + spec.worker * 100 + task)
    sequence = 0
    while len(result.approved) < spec.max_approvals:
        shard = _pick_shard(spec, rng)
        reservation_id = f"w{spec.worker}t{task}n{sequence}"
        sequence += 1
        while True:
            try:
                if await _reserve(spec, escrow, shard, reservation_id, rng, result):
                    result.approved.append((shard, reservation_id))
                    break
                result.declined += 1
                return
            except EscrowUnavailable:
                result.unavailable += 1  # the same id again: idempotent


async def _reserve(
    spec: LoadSpec, escrow: EscrowBudget, shard: int, reservation_id: str, rng: random.Random, result: LoadResult
) -> bool:
    """reserve_or_borrow, with a borrower that sometimes dies after the debit."""
    while True:
        reservation = await escrow.reserve(shard, reservation_id, 1)
        if reservation.approved:
            return True
        need = max(1 - reservation.available, spec.chunk)
        lenders = [s for s in range(spec.shards) if s != shard]
        rng.shuffle(lenders)
        for lender in lenders:
            if rng.random() < spec.abandon:
                if await escrow.debit(lender, uuid.uuid4().hex, need, shard) > 0:
                    result.abandoned += 1  # "crashed": no credit, no settle
                continue
            if (await escrow.borrow(shard, lender, need)).amount > 0:
                break
        else:
            return False


async def _run(spec: LoadSpec) -> LoadResult:
    cluster = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in spec.startup])
    escrow = EscrowBudget(
        cluster, prefix=spec.prefix, campaign_id=spec.campaign_id, category=spec.category, shards=spec.shards
    )
    result = LoadResult()
    try:
        await asyncio.gather(*(_caller(spec, escrow, task, result) for task in range(spec.tasks)))
    finally:
        result.retried = escrow.retried
        await escrow.aclose()
        await cluster.aclose()
    return result


def run_load(spec: LoadSpec) -> LoadResult:
    """The process's entry point (multiprocessing, spawn)."""
    return asyncio.run(_run(spec))
