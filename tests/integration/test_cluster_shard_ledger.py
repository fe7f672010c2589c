"""The consumer shards' ``ledger`` streams drained into the double-entry ledger (issue 16,
storage/postgres/writer.py with a shard's keys, server/processes/writer.py with
SUBSIDY_REDIS_SHARDS) on the real six-node local cluster: sales, captures, voids and refunds
through ShardedStore on six shards, each shard's stream drained by its own LedgerWriter into the
same tables as one Redis's, every event once under its shard-qualified id, the authorizations and
the budget counters agreeing with the shards'; two shards' entries with the same stream id both
recorded; the writer process killed between a commit and its acknowledgement and restarted."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from storage.cluster_dev import LocalCluster, free_port
from storage.devenv import Services
from storage.postgres.audit import Counters, compare, ledger_counters, redis_counters, verify
from storage.postgres.migrate import migrate
from storage.postgres.writer import LedgerWriter, WriterConfig, lag
from storage.redis.cluster.shards import ShardedStore, ShardLayout, publish_to_shards
from storage.redis.contract import Approved, Failure
from storage.redis.keys import Keys
from tests.conftest import ROOT, with_database
from tests.integration import cluster_fixtures, shard_load
from tests.integration.shard_load import CAMPAIGN, SUBSIDY_FEN, lifecycle, sale
from tests.integration.test_cluster_shards import consumers_of, fund, new_prefix

redis_cluster = cluster_fixtures.redis_cluster
cluster_client = cluster_fixtures.cluster_client

SALES_PER_SHARD = 5  # each shard is funded for this many; one more consumer per shard is declined
GROUP = "ledger-writer"


@pytest.fixture
async def ledger_dsn(services: Services) -> AsyncIterator[str]:
    """A migrated PostgreSQL database of this test's own, dropped afterwards."""
    database = f"subsidy_shard_ledger_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(services.pg_dsn, timeout=10)
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = with_database(services.pg_dsn, database)
    try:
        connection = await asyncpg.connect(dsn)
        try:
            await migrate(connection)
        finally:
            await connection.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


def shard_writer(dsn: str, client: RedisCluster, keys: Keys, batch_size: int = 4) -> LedgerWriter:
    """A LedgerWriter of one shard's stream (small batches: a drain takes several)."""
    config = WriterConfig(
        pg_dsn=dsn, redis_url="redis://unused", prefix=keys.prefix, consumer=f"w@{keys.shard}", batch_size=batch_size
    )
    return LedgerWriter(config, client, keys)


async def sell(client: RedisCluster, layout: ShardLayout) -> list[str]:
    """Each shard funded for SALES_PER_SHARD sales and tried by one consumer more, from 8 tasks
    at once; then, from 8 tasks too, a third of the approvals captured (every other capture then
    refunded), a third voided, a third left pending. Returns the approved authorization ids."""
    await publish_to_shards(
        client, layout, shard_load.snapshot(budget_fen=layout.count * SALES_PER_SHARD * SUBSIDY_FEN)
    )
    await fund(client, layout, SALES_PER_SHARD * SUBSIDY_FEN)
    store = await shard_load.sharded_store(client, layout)
    queue = consumers_of(layout, SALES_PER_SHARD + 1)
    approved: list[str] = []

    async def till() -> None:
        while queue:
            reply = await store.authorize(sale(queue.pop()))
            assert not isinstance(reply, Failure)
            if isinstance(reply.body, Approved):
                approved.append(reply.body.authorization.authorization_id)

    await asyncio.gather(*(till() for _ in range(8)))
    assert len(approved) == layout.count * SALES_PER_SHARD
    work = list(enumerate(approved))

    async def settle(shop: ShardedStore) -> None:
        while work:
            index, authorization_id = work.pop()
            if index % 3 == 0:
                captured = await shop.capture(lifecycle(authorization_id))
                assert not isinstance(captured, Failure)
                if index % 2 == 0:
                    refunded = await shop.refund(lifecycle(authorization_id), ["l1"])
                    assert not isinstance(refunded, Failure)
            elif index % 3 == 1:
                voided = await shop.void(lifecycle(authorization_id))
                assert not isinstance(voided, Failure)

    await asyncio.gather(*(settle(store) for _ in range(8)))
    return approved


async def in_streams(client: RedisCluster, layout: ShardLayout) -> dict[str, dict[str, Any]]:
    """Every shard's ledger stream as the ledger should hold it: shard-qualified id -> event."""
    found = {}
    for keys in layout.keys:
        for entry_id, fields in await client.xrange(keys.ledger):
            found[f"{entry_id.decode()}@{keys.shard}"] = orjson.loads(fields[b"e"])
    return found


async def in_ledger(dsn: str) -> dict[str, dict[str, Any]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT event_id, payload FROM ledger_events")
    finally:
        await connection.close()
    return {row["event_id"]: orjson.loads(row["payload"]) for row in rows}


async def shard_counters(client: RedisCluster, layout: ShardLayout) -> Counters:
    """The shards' money counters summed (audit.redis_counters of each shard's keys), without
    the shard budget's own ``:funded`` field (storage/redis/cluster/shard_budget.py: not money
    the ledger moves). A consumer's usage and an authorization live in one shard only."""
    summed = Counters()
    for keys in layout.keys:
        shard = await redis_counters(client, keys)  # type: ignore[arg-type]  # it names this shard's keys only
        for key, value in shard.budget.items():
            if key[2] != "funded":
                summed.budget[key] = summed.budget.get(key, 0) + value
        for usage, units in shard.usage.items():
            summed.usage[usage] = summed.usage.get(usage, 0) + units
        summed.serials.update(shard.serials)
    return summed


async def check_ledger(
    dsn: str, client: RedisCluster, layout: ShardLayout, expected: dict[str, dict[str, Any]]
) -> None:
    """Every event once under its qualified id; the authorizations table equal to the shards'
    authorization hashes; the ledger's budget and usage sums equal to the shards' counters; the
    chain intact and balanced."""
    assert await in_ledger(dsn) == expected
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SELECT count(DISTINCT event_id) FROM ledger_events") == len(expected)
        rows = await connection.fetch("SELECT authorization_id, state, subsidy_fen, refunded_fen FROM authorizations")
        in_postgres = {row["authorization_id"]: (row["state"], row["subsidy_fen"], row["refunded_fen"]) for row in rows}
        in_redis = {}
        for authorization_id in in_postgres:
            keys = layout.keys[layout.shard_of_id(authorization_id)]
            held = await client.hgetall(keys.authorization(authorization_id))
            in_redis[authorization_id] = (
                held[b"state"].decode(),
                int(held[b"subsidy_fen"]),
                int(held[b"refunded_fen"]),
            )
        assert in_postgres == in_redis
        assert len(in_postgres) == sum(event["type"] == "AUTHORIZED" for event in expected.values())
        ledger = await ledger_counters(connection)
        shards = await shard_counters(client, layout)
        assert compare(ledger, shards) == []
        assert shards.budget[(CAMPAIGN, shard_load.CATEGORY, "reserved")] > 0
        report = await verify(connection)
        assert report.ok, report
        assert report.debit_fen == report.credit_fen > 0
    finally:
        await connection.close()


async def test_every_shards_events_land_once_in_the_ledger_and_reconcile(
    cluster_client: RedisCluster, ledger_dsn: str
) -> None:
    """Six shards over three primaries, sales from 8 tasks, each shard drained by its own
    LedgerWriter (all at once, in batches of 4, over one cluster client): the ledger holds exactly
    the streams' events, each once under ``<entry id>@<shard>``, as many of each type as the
    streams hold; authorizations, budget and usage agree with the shards; a second drain adds
    nothing and the streams are trimmed."""
    layout = ShardLayout(new_prefix(), 6)
    approved = await sell(cluster_client, layout)
    expected = await in_streams(cluster_client, layout)  # before the writers trim what they wrote
    types = Counter(event["type"] for event in expected.values())
    assert types == {"AUTHORIZED": 30, "CAPTURED": 10, "VOIDED": 10, "REFUNDED": 5}
    writers = [shard_writer(ledger_dsn, cluster_client, keys) for keys in layout.keys]
    try:
        await asyncio.gather(*(writer.drain() for writer in writers))
        assert Counter(event["type"] for event in (await in_ledger(ledger_dsn)).values()) == types
        await check_ledger(ledger_dsn, cluster_client, layout, expected)
        assert {event["authorization_id"] for event in expected.values()} == set(approved)
        budget = (await shard_counters(cluster_client, layout)).budget
        assert budget[(CAMPAIGN, shard_load.CATEGORY, "spent")] > 0  # what check_ledger compared
        assert budget[(CAMPAIGN, shard_load.CATEGORY, "refunded")] > 0
        assert sum(writer.stats.events_written for writer in writers) == len(expected)
        assert sum(writer.stats.duplicates_skipped + writer.stats.dead_letters for writer in writers) == 0
        await asyncio.gather(*(writer.drain() for writer in writers))
        assert sum(writer.stats.events_written for writer in writers) == len(expected)
        for writer in writers:
            current = await lag(cluster_client, writer.keys, GROUP)
            assert (current.backlog, current.dead_letters) == (0, 0)
    finally:
        await asyncio.gather(*(writer.close() for writer in writers))


async def test_the_same_entry_id_in_two_shards_is_two_events(cluster_client: RedisCluster, ledger_dsn: str) -> None:
    """Two shards' primaries can hand out the same stream entry id: forced here (each shard's one
    sale re-added under one explicit id, XADD <id>). Both are recorded, neither taken for a
    redelivery of the other nor dead-lettered as a collision, and the ledger reconciles."""
    layout = ShardLayout(new_prefix(), 2)
    await publish_to_shards(cluster_client, layout, shard_load.snapshot(budget_fen=2 * SUBSIDY_FEN))
    await fund(cluster_client, layout, SUBSIDY_FEN)
    store = await shard_load.sharded_store(cluster_client, layout)
    for consumer in consumers_of(layout, 1):
        reply = await store.authorize(sale(consumer))
        assert not isinstance(reply, Failure) and isinstance(reply.body, Approved)
    entries = [await cluster_client.xrange(keys.ledger) for keys in layout.keys]
    assert [len(found) for found in entries] == [1, 1]
    shared = f"{max(int(found[0][0].split(b'-')[0]) for found in entries) + 1}-7"
    for keys, [(entry_id, fields)] in zip(layout.keys, entries, strict=True):
        await cluster_client.xdel(keys.ledger, entry_id)
        assert (await cluster_client.xadd(keys.ledger, fields, id=shared)).decode() == shared  # type: ignore[arg-type]
    expected = await in_streams(cluster_client, layout)
    assert sorted(expected) == sorted(f"{shared}@{keys.shard}" for keys in layout.keys)
    writers = [shard_writer(ledger_dsn, cluster_client, keys) for keys in layout.keys]
    try:
        for writer in writers:
            await writer.drain()
        assert [writer.stats.events_written for writer in writers] == [1, 1]
        assert sum(writer.stats.duplicates_skipped + writer.stats.dead_letters for writer in writers) == 0
        await check_ledger(ledger_dsn, cluster_client, layout, expected)
    finally:
        await asyncio.gather(*(writer.close() for writer in writers))


async def test_a_shard_writer_whose_group_cannot_be_created_yet_keeps_trying(
    cluster_client: RedisCluster, ledger_dsn: str
) -> None:
    """A shard writer's first command can fail (a fresh cluster client's first commands from
    six writers at once: redis-py 8.1 raised AttributeError 'NoneType' object has no attribute
    'writelines' on 6 of 400 fresh clients under CPU load, which ended that shard's task unseen
    and left its stream undrained). Forced here with a stream key of the wrong type (XGROUP CREATE
    answers WRONGTYPE): the writer keeps running and creates its group once the key is free."""
    (keys,) = ShardLayout(new_prefix(), 1).keys
    await cluster_client.set(keys.ledger, "not a stream")
    writer = shard_writer(ledger_dsn, cluster_client, keys)
    stopping = asyncio.Event()
    running = asyncio.create_task(writer.run(stopping))
    try:
        await asyncio.sleep(0.5)
        assert not running.done()
        await cluster_client.delete(keys.ledger)
        for _ in range(50):
            if await cluster_client.exists(keys.ledger):
                break
            await asyncio.sleep(0.1)
        assert [group["name"] for group in await cluster_client.xinfo_groups(keys.ledger)] == [GROUP.encode()]
    finally:
        stopping.set()
        await running
        await writer.close()


async def http_get(port: int, path: str) -> str:
    reader, stream = await asyncio.open_connection("127.0.0.1", port)
    stream.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    body = (await reader.read()).decode()
    stream.close()
    return body


async def test_the_writer_process_killed_mid_drain_loses_and_doubles_nothing(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, services: Services, ledger_dsn: str
) -> None:
    """``python -m server.ledger writer`` with SUBSIDY_REDIS_CLUSTER_NODES and
    SUBSIDY_REDIS_SHARDS=6 runs a LedgerWriter per shard; SIGKILLed by its fault injection after
    a shard writer's third batch (of 2) committed and before its XACK, others mid-drain too, it leaves
    part of the ledger written and entries pending; restarted, every event is in the ledger
    exactly once, the shards' backlogs are 0 in /metrics and /health, and it stops on SIGTERM."""
    layout = ShardLayout(new_prefix(), 6)
    await sell(cluster_client, layout)
    expected = await in_streams(cluster_client, layout)
    host, port = redis_cluster.startup_nodes[0]
    environ = {
        **os.environ,
        "SUBSIDY_PG_DSN": ledger_dsn,
        "SUBSIDY_REDIS_URL": services.redis_url,
        "SUBSIDY_REDIS_PREFIX": layout.prefix,
        "SUBSIDY_REDIS_CLUSTER_NODES": f"{host}:{port}",
        "SUBSIDY_REDIS_SHARDS": str(layout.count),
        "SUBSIDY_WRITER_BATCH_SIZE": "2",  # every shard's 5 or more events take 3 batches at least
    }

    async def start(**settings: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.ledger", "writer", cwd=ROOT, env={**environ, **settings}
        )

    async def backlogs() -> list[int]:
        return [(await lag(cluster_client, keys, GROUP)).backlog for keys in layout.keys]

    one_redis = Redis.from_url(services.redis_url)
    process = await start(SUBSIDY_WRITER_CRASH_AT="after_commit", SUBSIDY_WRITER_CRASH_AFTER_BATCHES="3")
    try:
        assert await asyncio.wait_for(process.wait(), 60) == -signal.SIGKILL
        written = len(await in_ledger(ledger_dsn))
        assert 3 * 2 <= written < len(expected)  # killed mid-drain
        pending = [(await lag(cluster_client, keys, GROUP)).pending for keys in layout.keys]
        assert sum(pending) > 0  # committed, not acknowledged: the restart meets them again
        metrics_port = free_port()
        process = await start(SUBSIDY_WRITER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
        for _ in range(300):
            if sum(await backlogs()) == 0:
                break
            await asyncio.sleep(0.1)
        assert await backlogs() == [0] * layout.count
        await check_ledger(ledger_dsn, cluster_client, layout, expected)
        head, _, body = (await http_get(metrics_port, "/health")).partition("\r\n\r\n")
        assert head.split()[1] == "200", body
        shards = orjson.loads(body)["shard_ledgers"]
        assert sorted(shards) == sorted(keys.shard for keys in layout.keys)
        assert all((shard["backlog"], shard["dead_letters"]) == (0, 0) for shard in shards.values())
        # The restarted writers met the batch committed but not acknowledged: skipped, not doubled
        # (the rest of what was pending had been read but not committed when the process died).
        assert 0 < sum(shard["stats"]["duplicates_skipped"] for shard in shards.values()) <= sum(pending)
        assert sum(shard["stats"]["events_written"] for shard in shards.values()) == len(expected) - written
        metrics = await http_get(metrics_port, "/metrics")
        for keys in layout.keys:
            assert f'subsidy_shard_ledger_backlog{{prefix="{layout.prefix}",shard="{keys.shard}"}} 0.0' in metrics
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
        # The process's one-Redis keys of this prefix (its own ledger stream's group and the like).
        doomed = [key async for key in one_redis.scan_iter(match=Keys(layout.prefix).pattern())]
        if doomed:
            await one_redis.unlink(*doomed)
        await one_redis.aclose()
