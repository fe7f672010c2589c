"""The consumer shards' ``qualification_events`` and ``risk_events`` streams written into PostgreSQL
(issue 16, server/processes/writer.py ``shard_consumers_of`` with SUBSIDY_REDIS_SHARDS) on the
real six-node local cluster: claims and cancellations made by the unchanged scripts inside each
shard (RedisStore on a shard's keys over the cluster client), and a blocked consumer's declined
claim (a risk event), drained by one QualificationMirror and one ShardRiskEventWriter per shard
into the same tables as one Redis's. Every qualification once in its final state, every risk event
once under ``<entry id>@<shard>`` (two shards' same entry id both kept), with two writer instances
draining at once; a poison entry set aside without stalling its shard, and shown per shard in the
writer's metrics and health; a stream unusable at start retried; two writer processes draining at
once, one SIGKILLed holding read entries, the other taking them over."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import signal
import sys
import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson
from prometheus_client import generate_latest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from server.config import Config
from server.processes.writer import (
    ShardConsumers,
    ShardLedgers,
    WriterMetrics,
    shard_consumers_of,
    writer_config,
)
from storage.cluster_dev import LocalCluster, free_port
from storage.devenv import Services
from storage.postgres.ledger import to_ms
from storage.postgres.qualifications import GROUP as MIRROR_GROUP
from storage.postgres.reference import ReferenceSnapshot
from storage.postgres.risk_events import GROUP as RISK_GROUP
from storage.postgres.writer import LedgerWriter
from storage.redis.cluster.shards import ShardLayout, publish_to_shards
from storage.redis.contract import CLAIM_DECLINE_REASONS, ClaimDeclined, Failure, Issued
from storage.redis.keys import Keys
from storage.redis.scripts import Scripts
from storage.redis.store import CancelInput, ClaimInput, RedisStore
from tests.conftest import ROOT
from tests.integration import cluster_fixtures, shard_load, test_cluster_shard_ledger
from tests.integration.shard_load import CAMPAIGN, CATEGORY, SUBSIDY_FEN
from tests.integration.test_cluster_shard_ledger import http_get
from tests.integration.test_cluster_shards import new_prefix

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client
ledger_dsn = test_cluster_shard_ledger.ledger_dsn

PARTNER = "app-shard"
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # a redemption code's (the table's CHECK)
CLAIMS_PER_SHARD = 4  # every other one then cancelled: 6 qualification events a shard


def claim_snapshot() -> ReferenceSnapshot:
    """The shard tests' campaign, issuing qualifications too (valid an hour, a quota of 10,000)."""
    base = shard_load.snapshot(budget_fen=SUBSIDY_FEN)
    return dataclasses.replace(
        base,
        campaigns=[{**base.campaigns[0], "qualification_validity_s": 3600}],
        rules=[{**base.rules[0], "qualification_quota": 10_000}],
    )


def consumers_of(layout: ShardLayout, per_shard: int) -> list[str]:
    """``per_shard`` new consumer keys (64 hex digits, as the gateway derives them) of each shard."""
    found: dict[int, list[str]] = {shard: [] for shard in range(layout.count)}
    while any(len(keys) < per_shard for keys in found.values()):
        key = os.urandom(32).hex()
        if len(found[shard := layout.shard_of_consumer(key)]) < per_shard:
            found[shard].append(key)
    return [key for keys in found.values() for key in keys]


def claim(consumer_key: str) -> ClaimInput:
    return ClaimInput(
        payload_hash=os.urandom(32).hex(),
        request_id=str(uuid.uuid4()),
        partner_id=PARTNER,
        nonce=os.urandom(12).hex(),
        campaign_id=CAMPAIGN,
        category=CATEGORY,
        consumer_key=consumer_key,
        redemption_code="".join(secrets.choice(CODE_ALPHABET) for _ in range(16)),
        location_verdict=0,
        masked_id_number="",
        masked_phone_number="",
        location_cell="",
    )


def cancel(code: str) -> CancelInput:
    return CancelInput(
        payload_hash=os.urandom(32).hex(),
        request_id=str(uuid.uuid4()),
        partner_id=PARTNER,
        nonce=os.urandom(12).hex(),
        redemption_code=code,
    )


@dataclasses.dataclass
class Claimed:
    """What the shards' scripts did: each code's shard, and the blocked consumers' declines."""

    shard_of_code: dict[str, int]
    blocked: int


async def claim_in_shards(client: RedisCluster, layout: ShardLayout, per_shard: int = CLAIMS_PER_SHARD) -> Claimed:
    """Per shard, ``per_shard`` consumers each claim a code through the claim script inside their
    shard (from 8 tasks at once), every other code is then cancelled (the cancel script, a second
    snapshot of it), and one consumer more, blocked in its shard, is declined CONSUMER_BLOCKED (a
    risk event in that shard's stream)."""
    await publish_to_shards(client, layout, claim_snapshot())
    scripts = Scripts(client)  # type: ignore[arg-type]  # a cluster client: each call's keys are one shard's
    await scripts.preload()
    stores = [RedisStore(client, keys, scripts, shard_load.LIMITS) for keys in layout.keys]  # type: ignore[arg-type]
    queue = consumers_of(layout, per_shard)
    claimed = Claimed({}, 0)

    async def partner_app() -> None:
        while queue:
            consumer = queue.pop()
            shard = layout.shard_of_consumer(consumer)
            request = claim(consumer)
            reply = await stores[shard].claim(request)
            assert not isinstance(reply, Failure) and isinstance(reply.body, Issued), reply
            claimed.shard_of_code[request.redemption_code] = shard
            if len(claimed.shard_of_code) % 2 == 0:
                cancelled = await stores[shard].cancel_qualification(cancel(request.redemption_code))
                assert not isinstance(cancelled, Failure), cancelled

    await asyncio.gather(*(partner_app() for _ in range(8)))
    for consumer in consumers_of(layout, 1):
        keys = layout.keys[layout.shard_of_consumer(consumer)]
        await client.hset(keys.blocks, f"CONSUMER:{consumer}", "0")  # type: ignore[misc]  # blocked for good
        reply = await stores[layout.shard_of_consumer(consumer)].claim(claim(consumer))
        assert not isinstance(reply, Failure) and isinstance(reply.body, ClaimDeclined), reply
        assert reply.body.reason == CLAIM_DECLINE_REASONS["CONSUMER_BLOCKED"]
        claimed.blocked += 1
    return claimed


async def in_redis(client: RedisCluster, layout: ShardLayout, claimed: Claimed) -> dict[str, tuple[Any, ...]]:
    """Each code's qualification hash in its shard: (state, consumer, campaign, category, updated ms)."""
    found = {}
    for code, shard in claimed.shard_of_code.items():
        held = await client.hgetall(layout.keys[shard].qualification(code))
        found[code] = (
            held[b"state"].decode(),
            held[b"consumer"].decode(),
            held[b"campaign"].decode(),
            held[b"category"].decode(),
            int(held[b"updated_ms"]),
        )
    return found


async def risk_streams(client: RedisCluster, layout: ShardLayout) -> dict[str, str]:
    """Every shard's risk event stream as PostgreSQL should hold it: ``<entry id>@<shard>`` -> subject."""
    found = {}
    for keys in layout.keys:
        for entry_id, fields in await client.xrange(keys.risk_events):
            found[f"{entry_id.decode()}@{keys.shard}"] = orjson.loads(fields[b"r"])["subject_id"]
    return found


async def stream_entries(client: RedisCluster, layout: ShardLayout) -> int:
    return sum([await client.xlen(keys.qualification_events) for keys in layout.keys]) + sum(
        [await client.xlen(keys.risk_events) for keys in layout.keys]
    )


async def in_postgres(dsn: str) -> tuple[dict[str, tuple[Any, ...]], dict[str, str]]:
    connection = await asyncpg.connect(dsn)
    try:
        qualifications = await connection.fetch(
            "SELECT redemption_code, state, consumer_key, campaign_id, category, updated_at FROM qualifications"
        )
        risk = await connection.fetch("SELECT stream_id, subject_id FROM risk_events")
    finally:
        await connection.close()
    return (
        {
            row["redemption_code"]: (
                row["state"],
                row["consumer_key"],
                row["campaign_id"],
                row["category"],
                to_ms(row["updated_at"]),
            )
            for row in qualifications
        },
        {row["stream_id"]: row["subject_id"] for row in risk},
    )


async def share_an_entry_id(client: RedisCluster, streams: list[str], field: bytes) -> str:
    """Each stream's last entry re-added under one id, above all of theirs (XADD <id>): two shards'
    primaries handing out the same id, forced. The last entry stays last, so a qualification's
    snapshots keep their order."""
    last = [(await client.xrevrange(stream, count=1))[0] for stream in streams]
    shared = f"{max(int(entry_id.split(b'-')[0]) for entry_id, _ in last) + 1}-7"
    for stream, (entry_id, fields) in zip(streams, last, strict=True):
        assert field in fields
        await client.xdel(stream, entry_id)
        assert (await client.xadd(stream, fields, id=shared)).decode() == shared  # type: ignore[arg-type]
    return shared


def config_of(cluster: LocalCluster, dsn: str, layout: ShardLayout, consumer: str, **settings: Any) -> Config:
    host, port = cluster.startup_nodes[0]
    return Config(
        pg_dsn=dsn,
        redis_prefix=layout.prefix,
        redis_cluster_nodes=f"{host}:{port}",
        redis_shards=layout.count,
        writer_consumer=consumer,
        writer_batch_size=2,  # a shard's 6 or more entries take 3 batches at least
        **settings,
    )


def every_consumer(instances: Iterable[ShardConsumers]) -> list[Any]:
    return [consumer for instance in instances for _, consumer in instance.consumers]


async def drained(client: RedisCluster, layout: ShardLayout, within_s: float = 30.0) -> bool:
    """Every shard's qualification and risk event streams empty (entries are deleted once written)."""
    for _ in range(int(within_s * 10)):
        if await stream_entries(client, layout) == 0:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_every_shards_qualifications_and_risk_events_land_once_with_two_writers_at_once(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, ledger_dsn: str
) -> None:
    """Six shards over three primaries: 24 claims (12 cancelled) and 6 blocked claims, and two
    shards' last qualification and risk entries re-added under one shared id. Two writer
    instances (consumers writer-a@<shard> and writer-b@<shard>, batches of 2) run every shard's
    mirror and risk event writer at once: PostgreSQL holds each qualification once, as its shard's
    hash holds it, and each risk event once under its shard-qualified id; the two instances
    together handled each entry once, nothing dead-lettered, the streams emptied. Fails with risk
    events under their bare entry id (the second shard's shared id is taken as a redelivery)."""
    layout = ShardLayout(new_prefix(), 6)
    claimed = await claim_in_shards(cluster_client, layout)
    assert len(claimed.shard_of_code) == 6 * CLAIMS_PER_SHARD and claimed.blocked == 6
    first, second = layout.keys[:2]
    await share_an_entry_id(cluster_client, [first.qualification_events, second.qualification_events], b"q")
    shared = await share_an_entry_id(cluster_client, [first.risk_events, second.risk_events], b"r")
    expected_qualifications = await in_redis(cluster_client, layout, claimed)
    assert sorted(state for state, *_ in expected_qualifications.values()) == ["CANCELLED"] * 12 + ["ISSUED"] * 12
    expected_risk = await risk_streams(cluster_client, layout)
    assert len(expected_risk) == 6 and {f"{shared}@{first.shard}", f"{shared}@{second.shard}"} <= set(expected_risk)
    entries = await stream_entries(cluster_client, layout)
    assert entries == 6 * (CLAIMS_PER_SHARD + CLAIMS_PER_SHARD // 2) + 6

    instances = [
        shard_consumers_of(config_of(redis_cluster, ledger_dsn, layout, name), ShardLedgers(cluster_client, []))
        for name in ("writer-a", "writer-b")
    ]
    stopping = asyncio.Event()
    running = [asyncio.create_task(consumer.run(stopping)) for consumer in every_consumer(instances)]
    try:
        assert await drained(cluster_client, layout)
    finally:
        stopping.set()
        await asyncio.gather(*running)
    assert await in_postgres(ledger_dsn) == (expected_qualifications, expected_risk)
    consumers = every_consumer(instances)
    assert sum(consumer.stats.written for consumer in consumers) == entries  # each entry once
    assert sum(consumer.stats.dead_letters + consumer.stats.postgres_failures for consumer in consumers) == 0
    for keys in layout.keys:
        for stream, group in ((keys.qualification_events, MIRROR_GROUP), (keys.risk_events, RISK_GROUP)):
            assert (await cluster_client.xpending(stream, group))["pending"] == 0
            assert await cluster_client.xlen(stream + ":dead") == 0
    details = await instances[0].snapshot()
    assert sorted(details) == sorted(keys.shard for keys in layout.keys)
    assert ShardConsumers.healthy(details)


async def test_a_poison_entry_is_set_aside_and_shown_for_its_shard_alone(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, ledger_dsn: str, services: Services
) -> None:
    """A qualification entry no mirror can parse, amid a shard's real ones: set aside in that
    shard's dead-letter stream, every other entry of that shard and the others written; the
    writer's metrics show the dead letter for that shard and consumer only, every backlog 0, and
    its health is false."""
    layout = ShardLayout(new_prefix(), 3)
    claimed = await claim_in_shards(cluster_client, layout, per_shard=2)
    poisoned = layout.keys[1]
    poison_id = (await cluster_client.xadd(poisoned.qualification_events, {"q": b"{not json"})).decode()
    more = await claim_in_shards(cluster_client, layout, per_shard=1)  # entries after it: the shard goes on
    claimed.shard_of_code.update(more.shard_of_code)
    expected = await in_redis(cluster_client, layout, claimed)
    config = config_of(redis_cluster, ledger_dsn, layout, "writer-p", redis_url=services.redis_url)
    instance = shard_consumers_of(config, ShardLedgers(cluster_client, []))
    one_redis = Redis.from_url(services.redis_url)
    stopping = asyncio.Event()
    running = [asyncio.create_task(consumer.run(stopping)) for _, consumer in instance.consumers]
    try:
        assert await drained(cluster_client, layout)
        assert (await in_postgres(ledger_dsn))[0] == expected
        dead = await cluster_client.xrange(poisoned.qualification_events + ":dead")
        assert [(fields[b"id"].decode(), fields[b"q"]) for _, fields in dead] == [(poison_id, b"{not json")]
        metrics = WriterMetrics(LedgerWriter(writer_config(config), one_redis), shard_consumers=instance)
        details = await metrics.snapshot()
        assert not ShardConsumers.healthy(details["shard_consumers"])
        text = generate_latest(metrics.registry).decode()
        for keys in layout.keys:
            for name in ("qualification_mirror", "risk_events"):
                labels = f'consumer="{name}",prefix="{layout.prefix}",shard="{keys.shard}"'
                dead_letters = 1 if (keys, name) == (poisoned, "qualification_mirror") else 0
                assert f"subsidy_shard_stream_consumer_backlog{{{labels}}} 0.0" in text
                assert f"subsidy_shard_stream_consumer_dead_letters{{{labels}}} {dead_letters}.0" in text
    finally:
        stopping.set()
        await asyncio.gather(*running)
        await one_redis.aclose()


async def test_a_shard_stream_unusable_at_start_is_retried_and_the_others_drain(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, ledger_dsn: str
) -> None:
    """Shard 0's qualification stream key holds a string when the writer starts (its group cannot
    be created: WRONGTYPE, as a fresh cluster client's first command can fail): the other shards'
    qualifications are written meanwhile, the writer's health is false, and once the key is free
    the mirror creates its group and writes shard 0's next claim."""
    layout = ShardLayout(new_prefix(), 2)
    stuck, free = layout.keys
    await cluster_client.set(stuck.qualification_events, "not a stream")
    instance = shard_consumers_of(
        config_of(redis_cluster, ledger_dsn, layout, "writer-r"), ShardLedgers(cluster_client, [])
    )
    stopping = asyncio.Event()
    running = [asyncio.create_task(consumer.run(stopping)) for _, consumer in instance.consumers]
    try:
        await publish_to_shards(cluster_client, layout, claim_snapshot())
        scripts = Scripts(cluster_client)  # type: ignore[arg-type]
        await scripts.preload()
        (consumer,) = [key for key in consumers_of(layout, 1) if layout.shard_of_consumer(key) == 1]
        reply = await RedisStore(cluster_client, free, scripts, shard_load.LIMITS).claim(claim(consumer))  # type: ignore[arg-type]
        assert not isinstance(reply, Failure) and isinstance(reply.body, Issued)
        for _ in range(100):
            if await cluster_client.xlen(free.qualification_events) == 0:
                break
            await asyncio.sleep(0.1)
        assert reply.body.qualification.redemption_code in (await in_postgres(ledger_dsn))[0]
        assert await instance.snapshot() == {"error": "ResponseError"}
        assert not any(task.done() for task in running)
        await cluster_client.delete(stuck.qualification_events)
        for _ in range(50):
            if await cluster_client.exists(stuck.qualification_events):
                break
            await asyncio.sleep(0.1)
        (consumer,) = [key for key in consumers_of(layout, 1) if layout.shard_of_consumer(key) == 0]
        reply = await RedisStore(cluster_client, stuck, scripts, shard_load.LIMITS).claim(claim(consumer))  # type: ignore[arg-type]
        assert not isinstance(reply, Failure) and isinstance(reply.body, Issued)
        assert await drained(cluster_client, layout, within_s=10)
        assert reply.body.qualification.redemption_code in (await in_postgres(ledger_dsn))[0]
        assert ShardConsumers.healthy(await instance.snapshot())
    finally:
        stopping.set()
        await asyncio.gather(*running)


async def health(port: int) -> tuple[str, dict[str, Any]]:
    head, _, body = (await http_get(port, "/health")).partition("\r\n\r\n")
    return head.split()[1], orjson.loads(body)


async def test_two_writer_processes_drain_at_once_and_one_killed_holding_entries_loses_nothing(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """Two ``python -m server.ledger writer`` processes (SUBSIDY_REDIS_SHARDS=6, consumers
    writer-a and writer-b, batches of 2, a dead consumer's entries taken over after 1 s). While a
    test transaction holds the qualifications and risk_events tables locked, the shards' claims
    are made, both processes read batches of every shard and wait on PostgreSQL; writer-a is then
    SIGKILLed holding its batches, the lock released. writer-b writes its own and takes over
    writer-a's: every qualification and risk event in PostgreSQL once, writer-b's stats count
    every entry once, its /metrics show each shard's backlogs at 0 and /health answers 200; it
    stops on SIGTERM."""
    layout = ShardLayout(new_prefix(), 6)
    host, port = redis_cluster.startup_nodes[0]
    environ = {
        **os.environ,
        "SUBSIDY_PG_DSN": ledger_dsn,
        "SUBSIDY_REDIS_URL": services.redis_url,
        "SUBSIDY_REDIS_PREFIX": layout.prefix,
        "SUBSIDY_REDIS_CLUSTER_NODES": f"{host}:{port}",
        "SUBSIDY_REDIS_SHARDS": str(layout.count),
        "SUBSIDY_WRITER_BATCH_SIZE": "2",
        "SUBSIDY_WRITER_CLAIM_IDLE_MS": "1000",
    }
    ports = {"writer-a": free_port(), "writer-b": free_port()}
    processes = {
        name: await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.ledger",
            "writer",
            cwd=ROOT,
            env={
                **environ,
                "SUBSIDY_WRITER_CONSUMER": name,
                "SUBSIDY_WRITER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            },
        )
        for name, metrics_port in ports.items()
    }
    one_redis = Redis.from_url(services.redis_url)
    locker = await asyncpg.connect(ledger_dsn)
    try:
        for metrics_port in ports.values():  # both started: migrated, serving
            for _ in range(300):
                try:
                    if (await health(metrics_port))[0] == "200":
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.1)
            assert (await health(metrics_port))[0] == "200"
        streams = [(keys.qualification_events, MIRROR_GROUP) for keys in layout.keys]
        streams += [(keys.risk_events, RISK_GROUP) for keys in layout.keys]

        async def groups_created() -> bool:
            for stream, group in streams:
                if not await cluster_client.exists(stream):
                    return False
                if group.encode() not in [found["name"] for found in await cluster_client.xinfo_groups(stream)]:
                    return False
            return True

        for _ in range(300):
            if await groups_created():
                break
            await asyncio.sleep(0.1)
        assert await groups_created()
        locking = locker.transaction()
        await locking.start()
        await locker.execute("LOCK TABLE qualifications, risk_events IN ACCESS EXCLUSIVE MODE")
        claimed = await claim_in_shards(cluster_client, layout)
        expected = (await in_redis(cluster_client, layout, claimed), await risk_streams(cluster_client, layout))
        entries = await stream_entries(cluster_client, layout)

        async def holding(name: str) -> int:
            """Entries the consumer ``name`` of every shard has read and not yet acknowledged."""
            held = 0
            for keys in layout.keys:
                for stream, group in ((keys.qualification_events, MIRROR_GROUP), (keys.risk_events, RISK_GROUP)):
                    for consumer in (await cluster_client.xpending(stream, group))["consumers"]:
                        held += consumer["pending"] if consumer["name"] == f"{name}@{keys.shard}".encode() else 0
            return held

        for _ in range(300):
            if await holding("writer-a") and await holding("writer-b"):
                break
            await asyncio.sleep(0.1)
        assert await holding("writer-a") > 0 and await holding("writer-b") > 0
        processes["writer-a"].kill()
        assert await processes["writer-a"].wait() == -signal.SIGKILL
        # Nothing written while locked (read inside the lock's own transaction).
        assert await locker.fetchval("SELECT count(*) FROM qualifications") == 0
        assert await locker.fetchval("SELECT count(*) FROM risk_events") == 0
        await locking.commit()
        assert await drained(cluster_client, layout)
        assert await holding("writer-a") == 0  # taken over, not left pending
        assert await in_postgres(ledger_dsn) == expected
        status, details = await health(ports["writer-b"])
        assert status == "200", details
        shards = details["shard_consumers"]
        assert sorted(shards) == sorted(keys.shard for keys in layout.keys)
        counted = [consumer for shard in shards.values() for consumer in shard.values()]
        assert all((consumer["backlog"], consumer["dead_letters"]) == (0, 0) for consumer in counted)
        assert sum(consumer["stats"]["written"] for consumer in counted) == entries
        metrics = (await http_get(ports["writer-b"], "/metrics")).partition("\r\n\r\n")[2]
        for keys in layout.keys:
            for name in ("qualification_mirror", "risk_events"):
                labels = f'consumer="{name}",prefix="{layout.prefix}",shard="{keys.shard}"'
                assert f"subsidy_shard_stream_consumer_backlog{{{labels}}} 0.0" in metrics
        processes["writer-b"].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(processes["writer-b"].wait(), 30) == 0
    finally:
        if not locker.is_closed():
            await locker.close()
        for process in processes.values():
            if process.returncode is None:
                process.kill()
                await process.wait()
        doomed = [key async for key in one_redis.scan_iter(match=Keys(layout.prefix).pattern())]
        if doomed:
            await one_redis.unlink(*doomed)
        await one_redis.aclose()
