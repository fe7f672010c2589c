"""Device serials on a cluster deployment (storage/redis/cluster/serials.py): one subsidy per
device across every consumer shard, each serial reserved in its home shard before the sale's
script runs in the consumer's shard, settled after it, and swept when a step was lost."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import msgspec
from redis.asyncio.cluster import RedisCluster

from storage.cluster_dev import LocalCluster
from storage.redis.cluster.shards import ShardedStore, ShardLayout, publish_to_shards
from storage.redis.contract import DECLINE_REASONS, Approved, Declined, Failure
from tests.integration import cluster_fixtures, shard_load
from tests.integration.shard_load import SUBSIDY_FEN, LoadSpec, lifecycle, sale
from tests.integration.test_cluster_shards import consumers_of, fund, new_prefix

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client

SHARDS = 6


async def world(cluster_client: RedisCluster, sales_per_shard: int = 1000) -> tuple[ShardLayout, ShardedStore]:
    layout = ShardLayout(new_prefix(), SHARDS)
    await publish_to_shards(
        cluster_client, layout, shard_load.snapshot(budget_fen=SHARDS * sales_per_shard * SUBSIDY_FEN)
    )
    await fund(cluster_client, layout, sales_per_shard * SUBSIDY_FEN)
    return layout, await shard_load.sharded_store(cluster_client, layout)


def device() -> str:
    return "SN" + os.urandom(6).hex().upper()


async def owner(store: ShardedStore, serial: str) -> str | None:
    assert store.serials is not None
    held = await store.serials.cluster.get(store.serials.owner_key(serial))
    return held.decode() if held is not None else None


def outcome(reply: object) -> str:
    assert not isinstance(reply, Failure), reply
    body = reply.body  # type: ignore[attr-defined]
    return "APPROVED" if isinstance(body, Approved) else f"DECLINED {body.reason}"


async def test_each_device_is_approved_once_when_consumers_of_three_shards_race_for_it_from_three_processes(
    redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    """60 devices, each wanted by 3 consumers of 3 different shards, the 180 sales sent by 3
    processes at once (each device's buyers in different processes): exactly 60 approved, one
    per device; every other sale declined SERIAL_ALREADY_SUBSIDISED; each device's owner record
    names its approved sale, and no declined sale keeps a reservation."""
    layout, _ = await world(cluster_client)
    consumers = consumers_of(layout, 30)  # 180: 30 in each shard, in shard order
    devices = [device() for _ in range(60)]
    # Buyer b of device d is from shard (d + 2b) % 6 and in process b: three shards, three processes.
    by_shard = {shard: consumers[shard * 30 : (shard + 1) * 30] for shard in range(SHARDS)}
    parts: list[tuple[list[str], list[str]]] = [([], []) for _ in range(3)]
    for index, serial in enumerate(devices):
        for buyer in range(3):
            parts[buyer][0].append(by_shard[(index + 2 * buyer) % SHARDS].pop())
            parts[buyer][1].append(serial)
    specs = [
        LoadSpec(redis_cluster.startup_nodes, layout.prefix, layout.count, buyers, serials=serials, attempts=1)
        for buyers, serials in parts
    ]
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(pool, shard_load.run_load, spec) for spec in specs))
    assert not [failure for result in results for failure in result.failures]
    approved = [made for result in results for made in result.approved]
    assert len(approved) == 60
    declined = Counter(reason for result in results for reason, count in result.declined.items() for _ in range(count))
    assert declined == {DECLINE_REASONS["SERIAL_ALREADY_SUBSIDISED"]: 120}
    store = await shard_load.sharded_store(cluster_client, layout)
    bought = {consumer: serial for buyers, serials in parts for consumer, serial in zip(buyers, serials, strict=True)}
    assert sorted(bought[consumer] for consumer, _ in approved) == sorted(devices)
    assert {serial: await owner(store, serial) for serial in devices} == {
        bought[consumer]: "P:" + made for consumer, made in approved
    }


async def test_void_frees_a_device_capture_keeps_it_and_a_refund_of_its_line_frees_it(
    cluster_client: RedisCluster,
) -> None:
    layout, store = await world(cluster_client)
    buyers = consumers_of(layout, 1)
    serial = device()
    first = await store.authorize(sale(buyers[0], serial=serial))
    assert outcome(first) == "APPROVED"
    first_id = first.body.authorization.authorization_id  # type: ignore[union-attr]
    assert await owner(store, serial) == "P:" + first_id
    assert outcome(await store.authorize(sale(buyers[1], serial=serial))) == (
        f"DECLINED {DECLINE_REASONS['SERIAL_ALREADY_SUBSIDISED']}"
    )
    await store.void(lifecycle(first_id))
    assert await owner(store, serial) is None
    second = await store.authorize(sale(buyers[1], serial=serial))
    assert outcome(second) == "APPROVED"
    second_id = second.body.authorization.authorization_id  # type: ignore[union-attr]
    await store.capture(lifecycle(second_id))
    assert await owner(store, serial) == "C:" + second_id
    assert outcome(await store.authorize(sale(buyers[2], serial=serial))) != "APPROVED"
    refunded = await store.refund(lifecycle(second_id), [])
    assert not isinstance(refunded, Failure)
    assert await owner(store, serial) is None
    assert outcome(await store.authorize(sale(buyers[3], serial=serial))) == "APPROVED"


async def test_a_retry_names_the_same_authorization_and_reserves_nothing_new(cluster_client: RedisCluster) -> None:
    layout, store = await world(cluster_client)
    consumer = consumers_of(layout, 1)[0]
    request = sale(consumer, serial=device())
    first = await store.authorize(request)
    again = await store.authorize(msgspec.structs.replace(request, nonce=os.urandom(12).hex()))
    assert outcome(first) == outcome(again) == "APPROVED" and again.replayed  # type: ignore[union-attr]
    assert first.body.authorization.authorization_id == again.body.authorization.authorization_id  # type: ignore[union-attr]


async def test_a_declined_sale_releases_its_reservation(cluster_client: RedisCluster) -> None:
    """No budget in the consumer's shard: BUDGET_EXHAUSTED after the serial was reserved, and
    the reservation is released at once."""
    layout, store = await world(cluster_client, sales_per_shard=0)
    serial = device()
    declined = await store.authorize(sale(consumers_of(layout, 1)[0], serial=serial))
    assert outcome(declined) == f"DECLINED {DECLINE_REASONS['BUDGET_EXHAUSTED']}"
    assert await owner(store, serial) is None


async def test_the_sweep_settles_what_a_lost_step_left(cluster_client: RedisCluster) -> None:
    """A reservation whose sale never ran (its gateway stopped between the two steps) is
    released once past its expiry; a capture whose confirmation was lost is confirmed; a sale
    still pending is looked at again later, its reservation kept."""
    layout, store = await world(cluster_client)
    assert store.serials is not None
    orphan = device()
    reserved = await store.serials.reserve([orphan], layout.new_authorization_id(0), expires_ms=1)
    assert reserved[orphan].state == "new"
    captured, pending = device(), device()
    buyers = consumers_of(layout, 1)
    sold = await store.authorize(sale(buyers[0], serial=captured))
    sold_id = sold.body.authorization.authorization_id  # type: ignore[union-attr]
    # Captured in its shard without the store's confirmation step (a gateway stopped after it).
    await store.stores[layout.shard_of_id(sold_id)].capture(lifecycle(sold_id))
    held = await store.authorize(sale(buyers[1], serial=pending))
    held_id = held.body.authorization.authorization_id  # type: ignore[union-attr]
    for serial in (captured, pending):  # their reservations due now
        await store.serials.cluster.zadd(store.serials.pending_key(store.serials.home(serial)), {serial: 1})
    settled = 0
    for shard in range(SHARDS):
        settled += await store.serials.settle_due(shard, 100)
    assert settled == 3
    assert await owner(store, orphan) is None
    assert await owner(store, captured) == "C:" + sold_id
    assert await owner(store, pending) == "P:" + held_id
    assert await store.serials.cluster.zscore(store.serials.pending_key(store.serials.home(pending)), pending) > 1
    assert outcome(await store.authorize(sale(buyers[2], serial=orphan))) == "APPROVED"
    assert isinstance((await store.authorize(sale(buyers[3], serial=captured))).body, Declined)  # type: ignore[union-attr]


async def test_a_refused_duplicate_attempt_never_unguards_the_sale_it_duplicates(cluster_client: RedisCluster) -> None:
    """The same signed sale sent twice (same nonce): the second attempt shares the first's
    reservation ("again") and is refused NONCE_REUSED; it must not release the device, or a
    second consumer could be subsidised for it while the first sale lives."""
    layout, store = await world(cluster_client)
    buyers = consumers_of(layout, 1)
    serial = device()
    request = sale(buyers[0], serial=serial)
    first = await store.authorize(request)
    assert outcome(first) == "APPROVED"
    duplicate = await store.authorize(request)
    assert isinstance(duplicate, Failure) and duplicate.error == "NONCE_REUSED"
    assert await owner(store, serial) == "P:" + first.body.authorization.authorization_id  # type: ignore[union-attr]
    assert outcome(await store.authorize(sale(buyers[1], serial=serial))) == (
        f"DECLINED {DECLINE_REASONS['SERIAL_ALREADY_SUBSIDISED']}"
    )


async def test_a_retry_moves_its_reservation_out_and_a_late_extend_leaves_a_confirmed_one_alone(
    cluster_client: RedisCluster,
) -> None:
    layout, store = await world(cluster_client)
    assert store.serials is not None
    serial, authorization_id = device(), layout.new_authorization_id(0)
    pending = store.serials.pending_key(store.serials.home(serial))
    await store.serials.reserve([serial], authorization_id, expires_ms=1_000)
    assert (await store.serials.reserve([serial], authorization_id, expires_ms=5_000))[serial].state == "again"
    assert await cluster_client.zscore(pending, serial) == 5_000  # the retry's expiry, not the first's
    await store.serials.reserve([serial], authorization_id, expires_ms=2_000)
    assert await cluster_client.zscore(pending, serial) == 5_000  # never moved back
    await store.serials.settle([serial], authorization_id, "confirm")
    await store.serials.settle([serial], authorization_id, "extend", 9_000)  # read PENDING before the capture
    assert await cluster_client.zscore(pending, serial) is None
    assert await owner(store, serial) == "C:" + authorization_id


async def test_a_request_id_reused_after_its_answer_expired_never_overwrites_the_first_sale(
    cluster_client: RedisCluster,
) -> None:
    """Derived ids repeat for a reused (terminal, request id): once the first sale's stored answer
    has gone (after the idempotency window), the reuse takes the next id, not the first sale's."""
    layout, store = await world(cluster_client)
    first_buyer, second_buyer = consumers_of(layout, 2)[:2]  # both in shard 0: the same derived ids
    request = sale(first_buyer, serial=device())
    first = await store.authorize(request)
    first_id = first.body.authorization.authorization_id  # type: ignore[union-attr]
    shard = store.stores[layout.shard_of_id(first_id)]
    await cluster_client.delete(shard.keys.idempotency(request.terminal_id, request.request_id))
    reused = msgspec.structs.replace(
        sale(second_buyer, serial=device()), request_id=request.request_id, terminal_id=request.terminal_id
    )
    later = await store.authorize(reused)
    assert outcome(later) == "APPROVED"
    assert later.body.authorization.authorization_id != first_id  # type: ignore[union-attr]
    assert (await cluster_client.hget(shard.keys.authorization(first_id), "consumer")) == first_buyer.encode()
