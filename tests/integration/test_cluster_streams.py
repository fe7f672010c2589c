"""The shards' ledger streams drained into PostgreSQL exactly once (storage/redis/cluster/streams.py,
storage/postgres/shard_writer.py, docs/scale-out.md 2.3) on the real six-node local cluster:
every shard's events, over all three primaries, once each; a writer that stored a batch and died
before acknowledging it; the replication fence (a reader is never handed an entry the replica
lacks); and several processes reserving a budget while a primary is killed and the writer runs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from server.commands.common import EXIT_PROBLEM
from server.commands.ledger import with_connections
from server.processes.writer import ShardWriting, WriterMetrics, serve_metrics
from storage.cluster_dev import LocalCluster
from storage.cluster_dev import free_port as _free_port
from storage.postgres.ledger import EventCollision
from storage.postgres.shard_writer import ShardLedgerWriter, store_entries
from storage.postgres.writer import LedgerWriter, WriterConfig
from storage.redis.cluster.escrow import EscrowBudget
from storage.redis.cluster.streams import (
    ShardStreamReader,
    StreamEntry,
    StreamsLag,
    dead_letter_key,
    hash_tag,
    registry_key,
)
from tests.conftest import ROOT, Environment
from tests.integration import cluster_fixtures
from tests.integration.test_cluster_escrow import (
    _check_exactly_the_budget,
    _load,
)

redis_cluster = cluster_fixtures.redis_cluster  # the module's fixture
cluster_client = cluster_fixtures.cluster_client

CATEGORY = "phone"


@pytest.fixture
def prefix() -> str:
    """A deployment prefix of its own per test: its own registry, hence its own streams."""
    return "sw" + uuid.uuid4().hex[:8]


async def _stored(environment: Environment, prefix: str) -> dict[tuple[str, str], dict[str, str]]:
    """What PostgreSQL holds of the streams whose tag starts with ``prefix``."""
    connection = await asyncpg.connect(environment.pg_dsn)
    try:
        rows = await connection.fetch(
            "SELECT stream, entry_id, payload FROM shard_events WHERE stream LIKE $1", "{" + prefix + ":%"
        )
    finally:
        await connection.close()
    return {(row["stream"], row["entry_id"]): orjson.loads(row["payload"]) for row in rows}


async def _in_redis(escrow: EscrowBudget) -> dict[tuple[str, str], dict[str, str]]:
    """Every entry of every shard stream, read on the primaries now."""
    found = {}
    for shard in range(escrow.shards):
        stream = escrow.ledger_key(shard)
        client = await escrow._node_client(stream)
        for entry_id, fields in await client.xrange(stream):
            found[(stream, entry_id.decode())] = {k.decode(): v.decode() for k, v in fields.items()}
    return found


def _check_one_event_per_reservation(stored: dict[tuple[str, str], dict[str, str]], budget: int) -> None:
    reserved = [fields["id"] for fields in stored.values() if fields["event"] == "RESERVED"]
    assert len(reserved) == len(set(reserved))
    funded = sum(int(fields["amount"]) for fields in stored.values() if fields["event"] == "SHARD_FUNDED")
    moved_out = sum(int(fields["amount"]) for fields in stored.values() if fields["event"] == "TRANSFER_OUT")
    moved_in = sum(int(fields["amount"]) for fields in stored.values() if fields["event"] == "TRANSFER_IN")
    assert funded == budget and moved_out == moved_in


async def test_every_shards_stream_lands_once(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """Six shards spread over the three primaries, reservations and transfers on all of them:
    after a drain PostgreSQL holds exactly the entries of every stream, once (an entry id is
    unique per stream only, so the same id on two shards is two events); a second drain adds
    nothing; a writer that stored a batch and died before acknowledging it leaves the batch
    pending, and the next drain skips every entry of it as already stored."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c1", category=CATEGORY, shards=6)
    budget = 60
    await escrow.setup(budget)
    for number in range(20):  # shard 0 and 1 only: they run dry and borrow from the others
        assert (await escrow.reserve_or_borrow(number % 2, f"r{number}", 2, chunk=3)).approved
    reader = ShardStreamReader(cluster_client, prefix)
    writer = ShardLedgerWriter(reader, environment.pg_dsn)
    try:
        assert sorted(await reader.streams()) == sorted(escrow.ledger_key(s) for s in range(6))
        nodes = {reader.nodes.address_of(stream) for stream in await reader.streams()}
        assert len(nodes) == 3  # one read per primary, several streams each
        await writer.drain()
        stored = await _stored(environment, prefix)
        assert stored == await _in_redis(escrow)
        _check_one_event_per_reservation(stored, budget)
        assert sum(f["event"] == "RESERVED" for f in stored.values()) == 20
        assert sum(f["event"] == "TRANSFER_IN" for f in stored.values()) > 0  # borrowing happened
        assert writer.stats.events_written == len(stored) and writer.stats.duplicates_skipped == 0

        await writer.drain()
        assert writer.stats.events_written == len(stored)

        # A writer dies between its commit and its XACK: the batch stays pending for it.
        for number in range(20, 26):
            await escrow.reserve_or_borrow(number % 6, f"r{number}", 1)
        batch = await reader.read()
        assert len(batch) >= 6
        connection = await asyncpg.connect(environment.pg_dsn)
        try:
            assert await store_entries(connection, batch) == len(batch)
            # The same id with other content is a collision, never a silent duplicate.
            forged = StreamEntry(batch[0].stream, batch[0].entry_id, {**batch[0].fields, "amount": "999"})
            with pytest.raises(EventCollision):
                await store_entries(connection, [forged])
        finally:
            await connection.close()
        await writer.drain()
        assert writer.stats.duplicates_skipped == len(batch)
        assert await _stored(environment, prefix) == await _in_redis(escrow)
        assert await reader.backlog() == 0
    finally:
        await writer.close()
        await reader.aclose()
        await escrow.aclose()


async def test_a_reader_is_never_handed_an_entry_the_replica_lacks(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """Shard 0's replica is frozen and its link cut; a reservation is made on the primary (the
    producer without WAIT, so it is answered). A reader without the fence is handed its event;
    the fenced reader is not (WAIT answered 0: held back in its pending list). The primary is
    killed and the frozen replica promoted: the event is gone from Redis. After the drain
    PostgreSQL equals Redis: what the unfenced reader was handed would have been a ledger event
    of a reservation that no longer exists."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c2", category=CATEGORY, shards=2, wait_replicas=0)
    await escrow.setup(10)
    assert (await escrow.reserve(0, "before", 1)).approved
    fenced = ShardStreamReader(cluster_client, prefix, wait_timeout_ms=200)
    unfenced = ShardStreamReader(cluster_client, prefix, group="unfenced", wait_replicas=0)
    writer = ShardLedgerWriter(fenced, environment.pg_dsn)
    try:
        await writer.drain()  # "before" and the funding, replicated
        await unfenced.ack(await unfenced.read())
        primary, replica = cluster_fixtures.lose_the_replication_link(redis_cluster, escrow.escrow_key(0))
        try:
            assert (await escrow.reserve(0, "lost", 1)).approved
            handed = [entry.fields.get("id") for entry in await unfenced.read()]
            assert handed == ["lost"]
            assert await fenced.read() == []
            assert fenced.stats.fenced_out == 1
        finally:
            await cluster_fixtures.fail_over(redis_cluster, escrow.escrow_key(0), primary, replica)
        assert (await escrow.audit(10)).shards[0].reserved == 1  # "lost" is gone
        await writer.drain()
        stored = await _stored(environment, prefix)
        assert stored == await _in_redis(escrow)
        assert "lost" not in {fields.get("id") for fields in stored.values()}
    finally:
        await writer.close()
        await fenced.aclose()
        await unfenced.aclose()
        await escrow.aclose()


@pytest.mark.slow
async def test_the_writer_drains_every_shard_once_through_a_failover(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """Three processes reserve a budget of 4,800 over six shards with borrowing while the
    writer runs (1,200 could all be reserved between two polls of the killer on a fast VM, which
    then killed nothing mid-load); the hottest shard's primary is SIGKILLed at a quarter of it and its replica
    promoted. After the load, the sweep and the tail: PostgreSQL holds exactly every entry of
    every shard stream once, one RESERVED per reservation, exactly the budget reserved, as much
    transferred in as out."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c3", category=CATEGORY, shards=6)
    budget = 4800
    await escrow.setup(budget)
    reader = ShardStreamReader(cluster_client, prefix)
    writer = ShardLedgerWriter(reader, environment.pg_dsn, trim_interval_s=None)  # compared with XRANGE below
    stopping = asyncio.Event()
    running = asyncio.create_task(writer.run(stopping))
    try:
        results, seen_at_kill = await _load(escrow, redis_cluster, budget, kill_at=budget // 4)
        assert seen_at_kill is not None and seen_at_kill < budget
        written_during_load = writer.stats.events_written
        await _check_exactly_the_budget(escrow, budget, results)
        stopping.set()
        await running
        await writer.drain(timeout_s=60)
        stored = await _stored(environment, prefix)
        assert stored == await _in_redis(escrow)
        _check_one_event_per_reservation(stored, budget)
        assert sum(f["event"] == "RESERVED" for f in stored.values()) == budget
        print(
            f"written during the load {written_during_load}, in all {len(stored)};"
            f" reader {reader.stats}; writer {writer.stats}"
        )
        assert written_during_load > 0 and reader.stats.node_failures > 0
    finally:
        stopping.set()
        await running
        await writer.close()
        await reader.aclose()
        await escrow.aclose()


@pytest.mark.slow
async def test_the_writer_drains_every_shard_once_while_a_shard_stream_moves(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """Resharding under the writer: the hottest shard's slot (its budget, its reservations and
    its ledger stream with the consumer group) moves to another primary key by key while three
    processes reserve and the writer reads; the reader meets ASK, TRYAGAIN or MOVED, skips the
    node for a moment and follows the new map. PostgreSQL ends equal to the streams, each
    entry once."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c4", category=CATEGORY, shards=6)
    budget = 1200
    await escrow.setup(budget)
    reader = ShardStreamReader(cluster_client, prefix)
    writer = ShardLedgerWriter(reader, environment.pg_dsn, trim_interval_s=None)  # compared with XRANGE below
    stopping = asyncio.Event()
    running = asyncio.create_task(writer.run(stopping))
    stream = escrow.ledger_key(0)
    before = await escrow._node_client(stream)
    try:
        results, seen_at_move = await _load(escrow, redis_cluster, budget, move_at=budget // 4)
        assert seen_at_move is not None and seen_at_move < budget
        await escrow.refresh()
        assert await escrow._node_client(stream) is not before  # the stream lives elsewhere now
        await _check_exactly_the_budget(escrow, budget, results)
        stopping.set()
        await running
        await writer.drain(timeout_s=60)
        stored = await _stored(environment, prefix)
        assert stored == await _in_redis(escrow)
        _check_one_event_per_reservation(stored, budget)
        assert sum(f["event"] == "RESERVED" for f in stored.values()) == budget
        print(f"reader {reader.stats}; writer {writer.stats}")
    finally:
        stopping.set()
        await running
        await writer.close()
        await reader.aclose()
        await escrow.aclose()


async def test_a_dead_writers_entries_are_taken_over_by_another(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """Writer w1 reads a batch from every shard and dies before storing it (its entries stay in
    its pending list); writer w2 of the same group takes them over once idle for claim_idle_ms
    and stores every entry once; before that idle time it leaves them alone."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c5", category=CATEGORY, shards=6)
    await escrow.setup(60)
    for number in range(12):
        assert (await escrow.reserve_or_borrow(number % 6, f"r{number}", 1)).approved
    dead = ShardStreamReader(cluster_client, prefix, consumer="w1")
    survivor = ShardStreamReader(cluster_client, prefix, consumer="w2", claim_idle_ms=1500)
    writer = ShardLedgerWriter(survivor, environment.pg_dsn)
    try:
        held = await dead.read()
        assert len(held) == 18  # 6 fundings and 12 reservations, on three nodes
        assert await survivor.read() == [] and survivor.stats.claimed == 0  # not idle yet
        await asyncio.sleep(1.6)
        await writer.drain()
        assert survivor.stats.claimed == len(held)
        stored = await _stored(environment, prefix)
        assert stored == await _in_redis(escrow) and len(stored) == len(held)
        assert writer.stats.duplicates_skipped == 0
    finally:
        await writer.close()
        await dead.aclose()
        await survivor.aclose()
        await escrow.aclose()


async def test_trimming_removes_only_what_every_group_acknowledged(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """A second group ("audit") on the same streams: while it has read nothing, trimming
    removes nothing although the writer stored and acknowledged everything; once it has
    acknowledged all but one entry, trimming keeps that entry's stream from it on and empties
    the others; once it acknowledges that one too, every stream is empty. PostgreSQL keeps all."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c6", category=CATEGORY, shards=3)
    await escrow.setup(30)
    for number in range(6):
        assert (await escrow.reserve(number % 3, f"r{number}", 1)).approved
    reader = ShardStreamReader(cluster_client, prefix)
    audit = ShardStreamReader(cluster_client, prefix, group="audit", consumer="a1")
    writer = ShardLedgerWriter(reader, environment.pg_dsn, trim_interval_s=None)
    try:
        await audit.streams()  # its group exists, nothing read
        await writer.drain()
        everything = await _in_redis(escrow)
        assert len(everything) == 9  # 3 fundings, 6 reservations
        assert await reader.trim() == 0
        batch = await audit.read()
        (held,) = [entry for entry in batch if entry.fields.get("id") == "r4"]
        await audit.ack([entry for entry in batch if entry is not held])
        kept_stream = [key for key in everything if key[0] == held.stream and key[1] >= held.entry_id]
        assert await reader.trim() == len(everything) - len(kept_stream)
        assert sorted(await _in_redis(escrow)) == sorted(kept_stream)
        await audit.ack([held])
        assert await reader.trim() == len(kept_stream)
        assert await _in_redis(escrow) == {}
        assert len(await _stored(environment, prefix)) == 9
        # New events after a trim are read and stored as before.
        assert (await escrow.reserve(0, "after", 1)).approved
        await writer.drain()
        assert len(await _stored(environment, prefix)) == 10
    finally:
        await writer.close()
        await reader.aclose()
        await audit.aclose()
        await escrow.aclose()


async def test_the_writer_process_drains_the_shards_when_the_setting_names_the_cluster(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment
) -> None:
    """``python -m server.ledger writer`` with SUBSIDY_REDIS_CLUSTER_NODES set (one node named;
    the client finds the others) drains the shards' streams of its prefix into PostgreSQL next
    to the single Redis's ledger stream, trims them once idle, shows the shard writer running
    with no backlog in /health and /metrics, and stops cleanly on SIGTERM."""
    campaign = "p" + uuid.uuid4().hex[:8]
    escrow = EscrowBudget(cluster_client, prefix=environment.prefix, campaign_id=campaign, category=CATEGORY, shards=3)
    await escrow.setup(30)
    for number in range(12):
        assert (await escrow.reserve_or_borrow(number % 3, f"r{number}", 2)).approved
    expected = await _in_redis(escrow)  # before the writer can trim what it stored
    host, port = redis_cluster.startup_nodes[0]
    environ = {
        **os.environ,
        "SUBSIDY_PG_DSN": environment.pg_dsn,
        "SUBSIDY_REDIS_URL": environment.redis_url,
        "SUBSIDY_REDIS_PREFIX": environment.prefix,
        "SUBSIDY_REDIS_CLUSTER_NODES": f"{host}:{port}",
        "SUBSIDY_WRITER_METRICS_LISTEN": f"127.0.0.1:{(metrics_port := _free_port())}",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.ledger", "writer", cwd=ROOT, env=environ
    )
    reader = ShardStreamReader(cluster_client, environment.prefix)
    try:
        for _ in range(300):
            await asyncio.sleep(0.1)
            if await _stored(environment, f"{environment.prefix}:{campaign}") == expected:
                break
        assert await _stored(environment, f"{environment.prefix}:{campaign}") == expected
        assert await reader.backlog() == 0
        for _ in range(100):  # idle, the process trims what it acknowledged
            if sum(len(entries) for entries in [await _in_redis(escrow)]) == 0:
                break
            await asyncio.sleep(0.1)
        assert await _in_redis(escrow) == {}
        _, health = await _health(metrics_port)
        assert health["shard_streams"]["running"] and health["shard_streams"]["streams"] >= 3
        assert (health["shard_streams"]["backlog"], health["shard_streams"]["dead_letters"]) == (0, 0)
        metric = f'{{prefix="{environment.prefix}"}}'
        assert f"subsidy_shard_writer_running{metric} 1.0" in await _http_get(metrics_port, "/metrics")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
        await reader.aclose()
        await escrow.aclose()


async def test_poison_entries_of_one_shard_are_set_aside_and_the_other_shards_stored(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """Shard 1's stream gets an entry with a NUL in a field (PostgreSQL refuses it: jsonb has no
    \\u0000) and one whose fields are not UTF-8, among good ones on every shard. One drain:
    every good entry of every shard stored exactly once, the two poison entries set aside whole
    (fields as written, their entry id, the reason) in shard 1's dead-letter stream, in its
    slot, and acknowledged; the lag counts 2 dead letters and no backlog; a second drain changes
    nothing. PostgreSQL unreachable is not the entries' fault: nothing is set aside, the batch
    stays pending. Fails without the poison handling (the batch was retried forever, and a
    non-UTF-8 entry made every read raise)."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c7", category=CATEGORY, shards=3)
    await escrow.setup(30)
    for number in range(6):
        assert (await escrow.reserve(number % 3, f"r{number}", 1)).approved
    stream = escrow.ledger_key(1)
    client = await escrow._node_client(stream)
    nul = {b"event": b"RESERVED", b"id": b"bad\x00id", b"amount": b"1"}
    not_utf8 = {b"event": b"RESERVED", b"id": b"\xff\xfe", b"amount": b"1"}
    nul_id = (await client.xadd(stream, nul)).decode()  # type: ignore[arg-type]
    not_utf8_id = (await client.xadd(stream, not_utf8)).decode()  # type: ignore[arg-type]
    assert (await escrow.reserve(1, "after-the-poison", 1)).approved
    poison = {(stream, nul_id), (stream, not_utf8_id)}
    reader = ShardStreamReader(cluster_client, prefix)
    writer = ShardLedgerWriter(reader, environment.pg_dsn, trim_interval_s=None)
    unreachable = ShardLedgerWriter(reader, "postgresql://nobody@127.0.0.1:1/none")
    try:
        assert await unreachable.step() == 0 and unreachable.stats.postgres_failures == 1
        assert unreachable.stats.dead_letters == 0 and await client.xlen(dead_letter_key(stream)) == 0
        assert await reader.lag() == StreamsLag(streams=3, backlog=3 + 6 + 3, dead_letters=0)
        assert await reader.backlog() == 12

        await writer.drain(timeout_s=20)
        in_redis = {key: fields for key, fields in (await _in_redis_raw(escrow)).items() if key not in poison}
        stored = await _stored(environment, prefix)
        assert stored == {key: {k.decode(): v.decode() for k, v in f.items()} for key, f in in_redis.items()}
        assert len(stored) == 10 and writer.stats.events_written == 10 and writer.stats.duplicates_skipped == 0
        assert writer.stats.dead_letters == 2 and reader.stats.undecodable == 2  # read by both writers

        dead = dead_letter_key(stream)
        assert hash_tag(dead) == hash_tag(stream)
        assert await client.execute_command("CLUSTER", "KEYSLOT", dead) == await client.execute_command(
            "CLUSTER", "KEYSLOT", stream
        )
        set_aside = {fields.pop(b"source_id").decode(): fields for _, fields in await client.xrange(dead)}  # type: ignore[union-attr]
        assert set(set_aside) == {nul_id, not_utf8_id}
        assert set_aside[nul_id].pop(b"reason") == b"UntranslatableCharacterError"
        assert set_aside[not_utf8_id].pop(b"reason") == b"not UTF-8"
        assert set_aside == {nul_id: nul, not_utf8_id: not_utf8}  # whole, as written
        assert await reader.lag() == StreamsLag(streams=3, backlog=0, dead_letters=2)
        assert await reader.backlog() == 0

        await writer.drain(timeout_s=20)
        assert await client.xlen(dead) == 2 and writer.stats.dead_letters == 2
        assert len(await _stored(environment, prefix)) == 10
    finally:
        await writer.close()
        await unreachable.close()
        await reader.aclose()
        await escrow.aclose()


async def _in_redis_raw(escrow: EscrowBudget) -> dict[tuple[str, str], dict[bytes, bytes]]:
    found = {}
    for shard in range(escrow.shards):
        stream = escrow.ledger_key(shard)
        client = await escrow._node_client(stream)
        for entry_id, fields in await client.xrange(stream):
            found[(stream, entry_id.decode())] = fields
    return found


async def test_a_stopped_shard_writer_or_a_dead_letter_makes_the_writer_unhealthy(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment, prefix: str
) -> None:
    """The writer process's /health and /metrics with the shard writer running: 200 and the
    shard gauges at 0 once drained; a poison entry set aside: 503 and
    subsidy_shard_stream_dead_letters 1, 200 again once a human removed it; an entry id stored
    with other content (an EventCollision) stops the shard writer's task: 503 with running
    false and subsidy_shard_writer_running 0 (it was 200: the task's death showed nowhere)."""
    escrow = EscrowBudget(cluster_client, prefix=prefix, campaign_id="c8", category=CATEGORY, shards=3)
    await escrow.setup(30)
    for number in range(3):
        assert (await escrow.reserve(number, f"r{number}", 1)).approved
    redis = Redis.from_url(environment.redis_url)
    ledger = LedgerWriter(
        WriterConfig(pg_dsn=environment.pg_dsn, redis_url=environment.redis_url, prefix=environment.prefix), redis
    )
    await ledger.ensure_group()
    reader = ShardStreamReader(cluster_client, prefix)
    writer = ShardLedgerWriter(reader, environment.pg_dsn, idle_pause_s=0.05, trim_interval_s=None)
    shards = ShardWriting(writer)
    stopping = asyncio.Event()
    shards.task = asyncio.create_task(writer.run(stopping))
    server = await serve_metrics(WriterMetrics(ledger, shards=shards), "127.0.0.1:0")
    stream = escrow.ledger_key(2)
    client = await escrow._node_client(stream)
    metric = f'{{prefix="{environment.prefix}"}}'
    try:
        status, health = await _health_until(server.port, lambda h: h["shard_streams"].get("backlog") == 0)
        assert status == 200 and health["shard_streams"]["running"] and health["shard_streams"]["dead_letters"] == 0
        metrics = await _http_get(server.port, "/metrics")
        assert f"subsidy_shard_stream_backlog{metric} 0.0" in metrics
        assert f"subsidy_shard_stream_dead_letters{metric} 0.0" in metrics
        assert f"subsidy_shard_writer_running{metric} 1.0" in metrics

        await client.xadd(stream, {"event": "RESERVED", "id": "nul\x00", "amount": "1"})
        status, health = await _health_until(server.port, lambda h: h["shard_streams"].get("dead_letters") == 1)
        assert (status, health["status"], health["shard_streams"]["backlog"]) == (503, "degraded", 0)
        assert f"subsidy_shard_stream_dead_letters{metric} 1.0" in await _http_get(server.port, "/metrics")
        await client.delete(dead_letter_key(stream))  # resolved by a human
        assert (await _health(server.port))[0] == 200

        # An id stored with other content than the stream's entry: a broken invariant.
        forged_id = f"{await _now_ms(client) + 60_000}-0"
        connection = await asyncpg.connect(environment.pg_dsn)
        try:
            await connection.execute(
                "INSERT INTO shard_events (stream, entry_id, event_type, payload) VALUES ($1, $2, 'RESERVED', '{}')",
                stream,
                forged_id,
            )
        finally:
            await connection.close()
        await client.xadd(stream, {"event": "RESERVED", "id": "x", "amount": "1"}, id=forged_id)
        for _ in range(300):
            if shards.task.done():
                break
            await asyncio.sleep(0.1)
        assert shards.task.done() and isinstance(shards.task.exception(), EventCollision)
        status, health = await _health(server.port)
        assert status == 503 and not health["shard_streams"]["running"]
        assert health["shard_streams"]["stopped_by"] == "EventCollision" and health["shard_streams"]["backlog"] == 1
        assert f"subsidy_shard_writer_running{metric} 0.0" in await _http_get(server.port, "/metrics")
        assert f"subsidy_shard_stream_backlog{metric} 1.0" in await _http_get(server.port, "/metrics")
    finally:
        stopping.set()
        await asyncio.gather(shards.task, return_exceptions=True)
        server.close()
        await writer.close()
        await reader.aclose()
        await escrow.aclose()
        await redis.aclose()


async def test_ledger_lag_and_reconcile_show_the_shard_streams_when_the_setting_names_the_cluster(
    cluster_client: RedisCluster, redis_cluster: LocalCluster, environment: Environment
) -> None:
    """``subsidyctl ledger lag`` and ``ledger reconcile`` with SUBSIDY_REDIS_CLUSTER_NODES set
    show the shard streams' backlog and dead letters (under ``shard_streams``): a backlog is not
    a finding, a dead letter is (reconcile exits 1, 0 again once it is removed; lag shows it and
    exits 0, as for the other consumers), and a cluster that cannot be read is one too. Without
    the setting their output has no ``shard_streams``. Fails without them (they showed only in
    the writer's /health and /metrics)."""
    host, port = redis_cluster.startup_nodes[0]
    clustered = environment.config(redis_cluster_nodes=f"{host}:{port}")
    # The prefix is the session's: earlier tests of this module left their shard streams
    # (drained, none set aside); this test counts from what they left.
    _, before = await with_connections(clustered, "lag", force=False)
    earlier = before["shard_streams"]
    assert earlier["dead_letters"] == 0, earlier
    escrow = EscrowBudget(cluster_client, prefix=environment.prefix, campaign_id="c9", category=CATEGORY, shards=3)
    await escrow.setup(30)
    for number in range(3):
        assert (await escrow.reserve(number, f"r{number}", 1)).approved
    stream = escrow.ledger_key(1)
    client = await escrow._node_client(stream)
    writer = ShardLedgerWriter(ShardStreamReader(cluster_client, environment.prefix), environment.pg_dsn)

    async def shown(config: Any) -> tuple[int, dict[str, Any], int, dict[str, Any]]:
        status, reconciled = await with_connections(config, "reconcile", force=False)
        lag_status, lagging = await with_connections(config, "lag", force=False)
        return status, reconciled, lag_status, lagging

    try:
        status, reconciled, _, lagging = await shown(environment.config())
        assert status == 0 and set(reconciled["streams"]) == {"qualification_mirror", "risk_events"}
        assert "shard_streams" not in lagging

        streams = earlier["streams"] + 3
        # SHARD_FUNDED and RESERVED per shard, on what earlier tests left waiting
        waiting = {"streams": streams, "backlog": earlier["backlog"] + 3 + 3, "dead_letters": 0}
        status, reconciled, lag_status, lagging = await shown(clustered)
        assert (status, reconciled["streams"]["shard_streams"]) == (0, waiting)
        assert (lag_status, lagging["shard_streams"]) == (0, waiting)

        await client.xadd(stream, {"event": "RESERVED", "id": "nul\x00", "amount": "1"})
        await writer.drain(timeout_s=20)
        dead = {"streams": streams, "backlog": 0, "dead_letters": 1}
        status, reconciled, lag_status, lagging = await shown(clustered)
        assert (status, reconciled["differences"], any(reconciled["sweeper"].values())) == (EXIT_PROBLEM, [], False)
        assert reconciled["streams"] == {
            "qualification_mirror": {"backlog": 0, "dead_letters": 0},
            "risk_events": {"backlog": 0, "dead_letters": 0},
            "shard_streams": dead,
        }
        assert (lag_status, lagging["shard_streams"]) == (0, dead)

        await client.delete(dead_letter_key(stream))  # resolved by a human
        status, reconciled, _, _ = await shown(clustered)
        assert (status, reconciled["streams"]["shard_streams"]) == (0, {**dead, "dead_letters": 0})

        nobody = environment.config(redis_cluster_nodes=f"127.0.0.1:{_free_port()}")
        status, reconciled, lag_status, lagging = await shown(nobody)
        assert (status, reconciled["differences"]) == (EXIT_PROBLEM, [])
        assert reconciled["streams"]["shard_streams"] == lagging["shard_streams"] == {"error": "RedisClusterException"}
        assert lag_status == 0
    finally:
        await writer.close()
        await writer.reader.aclose()
        await escrow.aclose()


async def _now_ms(client: Redis) -> int:
    seconds, microseconds = await client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


async def _health(port: int) -> tuple[int, dict[str, Any]]:
    head, _, body = (await _http_get(port, "/health")).partition("\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


async def _health_until(
    port: int, condition: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
) -> tuple[int, dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status, health = await _health(port)
        if condition(health) or asyncio.get_running_loop().time() > deadline:
            return status, health
        await asyncio.sleep(0.1)


async def _http_get(port: int, path: str) -> str:
    reader, stream = await asyncio.open_connection("127.0.0.1", port)
    stream.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    body = (await reader.read()).decode()
    stream.close()
    return body


async def test_registry_key_refuses_a_bad_prefix() -> None:
    with pytest.raises(ValueError):
        registry_key("bad prefix")
    assert registry_key("p") == "{p}:shard-streams"
