"""The stream consumer the qualification mirror and the risk event writer share
(storage/postgres/stream_consumer.py), against real Redis and PostgreSQL: exactly once across a
consumer that dies, and poison entries set aside, whatever makes them poison."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
from redis.asyncio import Redis

from server.commands.common import EXIT_PROBLEM
from server.commands.ledger import with_connections
from server.processes.writer import WriterMetrics, serve_metrics
from storage.devenv import Services
from storage.postgres.qualifications import QualificationMirror
from storage.postgres.risk_events import GROUP, INSERT, RiskEventWriter, event_row
from storage.postgres.writer import LedgerWriter, WriterConfig
from tests.conftest import isolated_environment


def risk_event(subject_id: str, evidence: str = '{"limit": 3}') -> bytes:
    # Evidence as JSON text: some (an integer past 64 bits) is valid JSON that orjson cannot write.
    return (
        orjson.dumps(
            {
                "action": "DECLINE",
                "rule": "CONSUMER_BLOCKED",
                "subject_kind": "CONSUMER",
                "subject_id": subject_id,
                "campaign": "c-main",
                "request_id": "r-" + subject_id,
                "at_ms": 1_800_000_000_000,
            }
        )[:-1]
        + b',"evidence":'
        + evidence.encode()
        + b"}"
    )


def snapshot(code: str, issued_ms: int) -> bytes:
    return orjson.dumps(
        {
            "code": code,
            "state": "ISSUED",
            "campaign": "c-qual",
            "category": "general",
            "consumer": "ab" * 32,
            "partner": "p-wallet-01",
            "issued_ms": issued_ms,
            "expires_ms": 1_800_003_600_000,
            "updated_ms": 1_800_000_000_000,
        }
    )


async def test_a_dead_consumers_batch_is_written_once_and_poison_is_set_aside(services: Services) -> None:
    """A consumer reads six entries and dies having committed two of them but acknowledged
    none. Another consumer claims the batch: the three good entries are one row each (the two
    already written are not written again); the unparseable entry, one whose evidence holds an
    integer past 64 bits (valid JSON the row cannot be made of: it used to end the writer's
    task) and one PostgreSQL refuses (a NUL byte in text) go to the dead-letter stream whole;
    nothing stays pending. Fails if a redelivery adds a row, if a poison entry holds the batch
    back or ends the consumer, or if one is lost."""
    async with isolated_environment(services) as env:
        redis = Redis.from_url(env.redis_url)
        stream = env.keys.risk_events
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            good = [await redis.xadd(stream, {"r": risk_event(f"person-{index}")}) for index in range(3)]
            unparseable = await redis.xadd(stream, {"r": b"{not json"})
            unencodable = await redis.xadd(stream, {"r": risk_event("huge", '{"count": 18446744073709551616}')})
            refused = await redis.xadd(stream, {"r": risk_event("nul\x00byte")})

            dying = RiskEventWriter(redis, env.keys, env.pg_dsn, consumer="risk-dying")
            await dying.ensure_group()
            assert len(await dying._read(block=False)) == 6
            for index, entry_id in enumerate(good[:2]):  # committed before the crash, never acknowledged
                await connection.execute(INSERT, *event_row(entry_id.decode(), risk_event(f"person-{index}")))

            taking_over = RiskEventWriter(redis, env.keys, env.pg_dsn, consumer="risk-next", claim_idle_ms=0)
            await taking_over.drain()

            rows = await connection.fetch("SELECT stream_id, subject_id FROM risk_events ORDER BY stream_id")
            assert [row["stream_id"] for row in rows] == [entry_id.decode() for entry_id in good]
            assert [row["subject_id"] for row in rows] == ["person-0", "person-1", "person-2"]
            dead = await redis.xrange(stream + ":dead")
            assert [fields[b"id"] for _, fields in dead] == [unparseable, unencodable, refused]
            assert dead[2][1][b"r"] == risk_event("nul\x00byte")
            assert (taking_over.stats.written, taking_over.stats.dead_letters) == (3, 3)
            assert await redis.xlen(stream) == 0
            assert (await redis.xpending(stream, GROUP))["pending"] == 0
        finally:
            await connection.close()
            await redis.delete(stream, stream + ":dead")
            await redis.aclose()


async def test_a_consumer_whose_group_cannot_be_created_yet_keeps_trying(services: Services) -> None:
    """An error at start (here the stream key holds a string: XGROUP CREATE answers WRONGTYPE)
    used to end the consumer's task unseen, its stream never drained again until a restart:
    the risk event writer keeps running, creates its group once the key is free, and writes."""
    async with isolated_environment(services) as env:
        redis = Redis.from_url(env.redis_url)
        stream = env.keys.risk_events
        await redis.set(stream, "not a stream")
        writer = RiskEventWriter(redis, env.keys, env.pg_dsn, consumer="risk-late", block_ms=50)
        stopping = asyncio.Event()
        running = asyncio.create_task(writer.run(stopping))
        try:
            await asyncio.sleep(0.5)
            assert not running.done()
            await redis.delete(stream)
            await redis.xadd(stream, {"r": risk_event("late-person")})
            for _ in range(100):
                if writer.stats.written == 1:
                    break
                await asyncio.sleep(0.05)
            assert writer.stats.written == 1
        finally:
            stopping.set()
            await running
            await redis.delete(stream, stream + ":dead")
            await redis.aclose()


async def test_a_snapshot_out_of_the_time_range_is_set_aside_by_the_mirror(services: Services) -> None:
    """A qualification snapshot whose issue time no datetime can hold (OverflowError, which the
    mirror used to let end its task, stalling every later change) is dead-lettered; the next
    snapshot is mirrored and the stream is empty."""
    async with isolated_environment(services) as env:
        redis = Redis.from_url(env.redis_url)
        stream = env.keys.qualification_events
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            poison = await redis.xadd(stream, {"q": snapshot("0123456789ABCDEF", 9 * 10**18)})
            await redis.xadd(stream, {"q": snapshot("FEDCBA9876543210", 1_800_000_000_000)})
            mirror = QualificationMirror(redis, env.keys, env.pg_dsn, consumer="mirror-poison")
            await mirror.drain()
            codes = await connection.fetch("SELECT redemption_code FROM qualifications")
            assert [row["redemption_code"] for row in codes] == ["FEDCBA9876543210"]
            assert [fields[b"id"] for _, fields in await redis.xrange(stream + ":dead")] == [poison]
            assert (mirror.stats.written, mirror.stats.dead_letters) == (1, 1)
            assert await redis.xlen(stream) == 0
        finally:
            await connection.close()
            await redis.delete(stream, stream + ":dead")
            await redis.aclose()


async def test_set_aside_entries_show_in_reconcile_lag_metrics_and_health(services: Services) -> None:
    """A risk event dead-lettered is stuck work: ``ledger reconcile`` exits 1 and names it under
    ``streams``, ``ledger lag`` counts it, the writer's /metrics has it per consumer and its
    /health answers 503. Fails if a consumer's dead letters are visible nowhere (they were)."""
    async with isolated_environment(services) as env:
        redis = Redis.from_url(env.redis_url)
        stream = env.keys.risk_events
        try:
            status, result = await with_connections(env.config(), "reconcile", force=False)
            assert status == 0 and result["streams"]["risk_events"] == {"backlog": 0, "dead_letters": 0}
            await redis.xadd(stream, {"r": b"{not json"})
            await redis.xadd(stream, {"r": risk_event("waiting")})
            status, result = await with_connections(env.config(), "reconcile", force=False)
            assert status == 0 and result["streams"]["risk_events"] == {"backlog": 2, "dead_letters": 0}
            await RiskEventWriter(redis, env.keys, env.pg_dsn).drain()
            status, result = await with_connections(env.config(), "reconcile", force=False)
            assert (status, result["differences"]) == (EXIT_PROBLEM, [])
            assert result["streams"] == {
                "qualification_mirror": {"backlog": 0, "dead_letters": 0},
                "risk_events": {"backlog": 0, "dead_letters": 1},
            }
            _, lagging = await with_connections(env.config(), "lag", force=False)
            assert (lagging["risk_event_backlog"], lagging["risk_event_dead_letters"]) == (0, 1)

            writer = LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis)
            await writer.ensure_group()
            server = await serve_metrics(WriterMetrics(writer), "127.0.0.1:0")
            try:
                metrics = await http_get(server.port, "/metrics")
                assert (
                    f'subsidy_stream_consumer_dead_letters{{consumer="risk_events",prefix="{env.prefix}"}} 1.0'
                    in metrics
                )
                health = await http_get(server.port, "/health")
                assert " 503 " in health.splitlines()[0] and '"status":"degraded"' in health
                await redis.delete(stream + ":dead")  # resolved by a human
                assert " 200 " in (await http_get(server.port, "/health")).splitlines()[0]
            finally:
                server.close()
        finally:
            await redis.delete(stream, stream + ":dead")
            await redis.aclose()


async def http_get(port: int, path: str) -> str:
    reader, stream = await asyncio.open_connection("127.0.0.1", port)
    stream.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    body = (await reader.read()).decode()
    stream.close()
    return body
