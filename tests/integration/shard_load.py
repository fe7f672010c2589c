"""A load process for the sharded sale-path tests (test_cluster_shards.py): its own event loop,
cluster client and ``ShardedStore``, several concurrent tills sending one-line Authorizes of the
given consumers through the real authorize script, each consumer several times with new request
ids (the per-person limit of one must let exactly one through, whichever process sends it)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
from redis.asyncio.cluster import ClusterNode, RedisCluster

from storage.postgres.reference import ReferenceSnapshot
from storage.redis.cluster.serials import SerialRegistry
from storage.redis.cluster.shards import AcknowledgedScripts, NotAcknowledged, ShardedStore, ShardLayout
from storage.redis.contract import Approved, AuthorizeAnswer, Failure, Reply
from storage.redis.scripts import Scripts
from storage.redis.store import AuthorizeInput, LifecycleInput, LineInput, RedisStore, StoreLimits

CAMPAIGN, CATEGORY, MERCHANT, TERMINAL = "c-shard", "fridge", "m-shard", "t-shard"
GTIN = "06901234567892"
PRICE_FEN, SUBSIDY_FEN = 100_000, 100  # 15% of the price, capped at 100 fen
RETRY_FOR_S = 60.0
LIMITS = StoreLimits(hold_ttl_s=600, idempotency_ttl_s=86_400, nonce_ttl_s=600, programme_timezone="Asia/Shanghai")


def snapshot(budget_fen: int) -> ReferenceSnapshot:
    """One active campaign (per-person limit 1, 100 fen a fridge), its merchant and terminal."""
    now = datetime.now(UTC)
    return ReferenceSnapshot(
        campaigns=[
            {
                "campaign_id": CAMPAIGN,
                "status": "ACTIVE",
                "starts_at": now - timedelta(days=1),
                "ends_at": now + timedelta(days=30),
            }
        ],
        rules=[
            {
                "campaign_id": CAMPAIGN,
                "category": CATEGORY,
                "kind": "PERCENT",
                "rates_bp": {"1": 1500},
                "cap_fen": SUBSIDY_FEN,
                "threshold_fen": 0,
                "off_fen": 0,
                "price_ceiling_fen": 0,
                "per_person_limit": 1,
                "budget_fen": budget_fen,
                "tranches": [],
            }
        ],
        products=[
            {
                "gtin": GTIN,
                "active": True,
                "category": CATEGORY,
                "energy_grade": 1,
                "reference_price_fen": PRICE_FEN,
                "serial_required": False,
            }
        ],
        merchants=[{"merchant_id": MERCHANT, "status": "ACTIVE", "categories": [CATEGORY]}],
        terminals=[{"terminal_id": TERMINAL, "status": "ACTIVE", "merchant_id": MERCHANT, "secret": "s" * 32}],
        operators=[],
        partners=[],
    )


def sale(consumer_key: str, serial: str = "", redemption_code: str = "") -> AuthorizeInput:
    return AuthorizeInput(
        payload_hash=os.urandom(32).hex(),
        request_id=str(uuid.uuid4()),
        terminal_id=TERMINAL,
        merchant_id=MERCHANT,
        nonce=os.urandom(12).hex(),
        campaign_id=CAMPAIGN,
        consumer_key=consumer_key,
        channel=1,
        authorization_id=os.urandom(16).hex(),
        lines=[LineInput("l1", GTIN, PRICE_FEN, serial)],
        redemption_code=redemption_code,
    )


ID_KEY = b"shard-test-authorization-ids"


def lifecycle(authorization_id: str) -> LifecycleInput:
    """A capture, void or refund of the authorization by the test terminal (new request id, nonce)."""
    return LifecycleInput(
        payload_hash=os.urandom(32).hex(),
        request_id=os.urandom(16).hex(),
        terminal_id=TERMINAL,
        merchant_id=MERCHANT,
        nonce=os.urandom(12).hex(),
        authorization_id=authorization_id,
    )


async def sharded_store(
    client: RedisCluster,
    layout: ShardLayout,
    scripts: Scripts | None = None,
    *,
    serials: bool = True,
    limits: StoreLimits = LIMITS,
) -> ShardedStore:
    """The layout's store over ``scripts`` (default: plain cluster calls, no WAIT), with the
    device serials' registry unless ``serials`` is False."""
    scripts = scripts or Scripts(client)  # type: ignore[arg-type]
    await scripts.preload()
    return ShardedStore(
        layout,
        [RedisStore(client, keys, scripts, limits) for keys in layout.keys],  # type: ignore[arg-type]
        RedisStore(client, layout.control, scripts, limits),  # type: ignore[arg-type]
        id_key=ID_KEY,
        serials=SerialRegistry(client, layout.keys) if serials else None,
    )


@dataclass(frozen=True)
class LoadSpec:
    startup: list[tuple[str, int]]
    prefix: str
    shards: int
    consumers: list[str]
    # The device each consumer buys ("" for none), by position in ``consumers``.
    serials: list[str] = field(default_factory=list)
    attempts: int = 2  # sales per consumer, each with its own request id
    tasks: int = 8
    # WAIT 1 on every call, and a call not acknowledged (a primary killed) re-sent as a till
    # would: the same request re-signed with a new nonce, until answered (at most RETRY_FOR_S).
    acknowledged: bool = False
    # When given: incremented once the process has loaded its scripts, and the sales start when
    # it reaches ``processes`` (all started together, so a fault injected mid-load meets them all).
    ready_key: str = ""
    processes: int = 1


@dataclass
class LoadResult:
    approved: list[tuple[str, str]] = field(default_factory=list)  # (consumer key, authorization id)
    declined: dict[int, int] = field(default_factory=dict)  # decline reason -> count
    failures: list[str] = field(default_factory=list)
    unacknowledged: int = 0  # NotAcknowledged answers, each retried
    resent: dict[str, int] = field(default_factory=dict)  # AcknowledgedScripts.retried: why calls were re-sent


async def _load(spec: LoadSpec) -> LoadResult:
    client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in spec.startup])
    try:
        scripts = AcknowledgedScripts(client, wait_timeout_ms=500) if spec.acknowledged else None
        store = await sharded_store(client, ShardLayout(spec.prefix, spec.shards), scripts)
        if spec.ready_key:
            await client.incr(spec.ready_key)
            while int(await client.get(spec.ready_key) or 0) < spec.processes:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        devices = spec.serials or [""] * len(spec.consumers)
        queue = [pair for pair in zip(spec.consumers, devices, strict=True) for _ in range(spec.attempts)]
        result = LoadResult()

        async def answer(request: AuthorizeInput) -> Reply[AuthorizeAnswer]:
            give_up = time.monotonic() + RETRY_FOR_S
            while True:
                try:
                    return await store.authorize(request)
                except NotAcknowledged:
                    result.unacknowledged += 1
                    if time.monotonic() > give_up:
                        raise
                    request = msgspec.structs.replace(request, nonce=os.urandom(12).hex())
                    await asyncio.sleep(0.05)

        async def till() -> None:
            while queue:
                consumer, device = queue.pop()
                reply = await answer(sale(consumer, serial=device))
                if isinstance(reply, Failure):
                    result.failures.append(reply.error)
                elif isinstance(reply.body, Approved):
                    result.approved.append((consumer, reply.body.authorization.authorization_id))
                else:
                    reason = reply.body.reason
                    result.declined[reason] = result.declined.get(reason, 0) + 1

        await asyncio.gather(*(till() for _ in range(spec.tasks)))
        result.resent = dict(scripts.retried) if scripts else {}
        return result
    finally:
        await client.aclose()


def run_load(spec: LoadSpec) -> LoadResult:
    """A process pool's entry point."""
    return asyncio.run(_load(spec))
