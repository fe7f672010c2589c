"""The fund ledger: every reservation lands in PostgreSQL exactly once, and adds up.

Each test gets a database and a Redis prefix of its own, a gateway, and real traffic; the
writer runs as a real process where a crash is injected (SIGKILL at a chosen point)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from subsidy_client import AuthorizationClient, Line, ReportingClient, RetryPolicy
from subsidy_client.errors import InvalidState, PermissionDenied, Unauthenticated
from subsidy_client.v1 import authorization_pb2 as pb

from server.processes.app import Application
from server.processes.writer import WriterMetrics, serve_metrics
from storage.devenv import Services
from storage.postgres.audit import rebuild, reconcile, redis_counters, verify
from storage.postgres.reference import fetch_reference
from storage.postgres.writer import LedgerWriter, WriterConfig, lag
from storage.redis.reference import publish_reference
from tests.conftest import ROOT, Environment, consumer_key, isolated_environment, running_gateway, serial

FRIDGE_G1 = "6970000000017"  # 20%, serial required
WASHER = "6970000000093"
AIR_CONDITIONER = "6970000000116"  # serial required, 3 per person


@asynccontextmanager
async def ledger_world(
    services: Services, **overrides: object
) -> AsyncIterator[tuple[Environment, Application, AuthorizationClient]]:
    async with isolated_environment(services) as env, running_gateway(env.config(**overrides)) as gateway:
        client = AuthorizationClient(
            f"127.0.0.1:{gateway.port}", "t-main-01", env.credentials["t-main-01"], retry=RetryPolicy(max_attempts=1)
        )
        try:
            yield env, gateway, client
        finally:
            await client.close()


async def traffic(client: AuthorizationClient, sales: int) -> int:
    """Mixed traffic: authorize, then capture, void, full or partial refund. Returns the
    number of ledger events it caused."""
    events = 0

    async def one(index: int) -> int:
        lines = [Line("f", FRIDGE_G1, 300_000 + index, serial()), Line("w", WASHER, 150_000)]
        response = await client.authorize(campaign_id="c-main", consumer_key=consumer_key(), lines=lines)
        assert response.decision == pb.DECISION_APPROVED
        kind = index % 4
        if kind == 0:
            await client.void(response.authorization_id)
            return 2
        await client.capture(response.authorization_id)
        if kind == 2:
            await client.refund(response.authorization_id)
            return 3
        if kind == 3:
            await client.refund(response.authorization_id, ["w"])
            return 3
        return 2

    for count in await asyncio.gather(*(one(index) for index in range(sales))):
        events += count
    return events


async def run_writer_process(env: Environment, timeout_s: float = 60, **settings: str) -> int:
    """``python -m server.ledger writer`` with the given SUBSIDY_WRITER_* settings; returns its
    exit code (negative: killed by that signal). Without a crash point it is stopped by SIGTERM
    once the backlog is empty."""
    environ = {
        **os.environ,
        "SUBSIDY_PG_DSN": env.pg_dsn,
        "SUBSIDY_REDIS_URL": env.redis_url,
        "SUBSIDY_REDIS_PREFIX": env.prefix,
        "SUBSIDY_WRITER_BATCH_SIZE": "10",
        **{f"SUBSIDY_WRITER_{key.upper()}": value for key, value in settings.items()},
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.ledger", "writer", cwd=ROOT, env=environ
    )
    redis = Redis.from_url(env.redis_url)
    try:
        if "crash_at" not in settings:
            for _ in range(int(timeout_s * 20)):
                await asyncio.sleep(0.05)
                if (await lag(redis, env.keys, "ledger-writer")).backlog == 0:
                    break
            process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(process.wait(), timeout_s)
    finally:
        await redis.aclose()
        if process.returncode is None:
            process.kill()


async def ledger_counts(env: Environment) -> tuple[int, int]:
    connection = await asyncpg.connect(env.pg_dsn)
    try:
        events = await connection.fetchval("SELECT count(*) FROM ledger_events")
        distinct = await connection.fetchval("SELECT count(DISTINCT event_id) FROM ledger_events")
        return int(events), int(distinct)
    finally:
        await connection.close()


async def assert_ledger_matches(env: Environment, expected_events: int) -> None:
    """Every event exactly once, nothing pending, the chain intact, debits = credits, and Redis
    counters equal to the ledger's sums."""
    assert await ledger_counts(env) == (expected_events, expected_events)
    redis = Redis.from_url(env.redis_url)
    connection = await asyncpg.connect(env.pg_dsn)
    try:
        backlog = await lag(redis, env.keys, "ledger-writer")
        assert (backlog.pending, backlog.undelivered) == (0, 0)
        report = await verify(connection)
        assert report.ok, report
        assert report.debit_fen == report.credit_fen > 0
        assert await reconcile(connection, redis, env.keys) == []
    finally:
        await connection.close()
        await redis.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_commit", "after_commit", "after_ack"])
async def test_writer_killed_at_each_point_loses_and_doubles_nothing(services: Services, point: str) -> None:
    """SIGKILL the writer on its first batch before COMMIT, after COMMIT but before XACK, and
    after XACK; a restarted writer (the same consumer, or another one claiming the dead one's
    entries) leaves every event in PostgreSQL exactly once and the pending list empty."""
    async with ledger_world(services) as (env, _gateway, client):
        expected = await traffic(client, 12)
        code = await run_writer_process(env, crash_at=point, crash_after_batches="1")
        assert code == -signal.SIGKILL
        written, _ = await ledger_counts(env)
        assert written == (0 if point == "before_commit" else 10)
        redis = Redis.from_url(env.redis_url)
        pending = (await lag(redis, env.keys, "ledger-writer")).pending
        await redis.aclose()
        assert pending == (0 if point == "after_ack" else 10)
        # After an ack-less crash, a different consumer takes over the dead one's entries.
        takeover = {"consumer": "writer-2", "claim_idle_ms": "1"} if point == "after_commit" else {}
        assert await run_writer_process(env, **takeover) == 0
        await assert_ledger_matches(env, expected)


class Gate:
    """A TCP proxy to PostgreSQL that can be shut: connections are then refused and the open
    ones cut, as when the database goes away."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        port = parts.port or int(parse_qs(parts.query).get("port", ["5432"])[0])
        self.unix_path = f"{socket_dir}/.s.PGSQL.{port}" if socket_dir.startswith("/") else ""
        self.target = (parts.hostname or "127.0.0.1", port)
        self.parts = parts
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def open(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    def dsn(self, port: int) -> str:
        user = self.parts.username or "postgres"
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{port}", self.parts.path, "", ""))

    async def shut(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            if self.unix_path:
                upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


@pytest.mark.slow
async def test_postgres_outage_keeps_authorizing_and_the_ledger_catches_up(services: Services) -> None:
    """PostgreSQL goes away under load: authorizations are still answered from Redis and the
    stream grows; when it returns, the writer catches up with nothing lost or doubled."""
    async with ledger_world(services) as (env, _gateway, client):
        gate = Gate(env.pg_dsn)
        port = await gate.open()
        redis = Redis.from_url(env.redis_url)
        writer = LedgerWriter(
            WriterConfig(pg_dsn=gate.dsn(port), redis_url=env.redis_url, prefix=env.prefix, batch_size=20, block_ms=50),
            redis,
        )
        stopping = asyncio.Event()
        running = asyncio.create_task(writer.run(stopping))
        try:
            expected = await traffic(client, 8)
            for _ in range(200):
                if (await lag(redis, env.keys, "ledger-writer")).backlog == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await ledger_counts(env))[0] == expected
            await gate.shut()
            expected += await traffic(client, 20)  # answered while PostgreSQL is gone
            await asyncio.sleep(1.0)
            during = await lag(redis, env.keys, "ledger-writer")
            assert during.backlog > 0 and during.stream_length >= during.backlog
            assert writer.stats.postgres_failures > 0
            assert (await ledger_counts(env))[0] < expected
            await gate.open(port)
            for _ in range(400):
                if (await lag(redis, env.keys, "ledger-writer")).backlog == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            stopping.set()
            await running
            await gate.shut()
            await redis.aclose()
        await assert_ledger_matches(env, expected)


@pytest.mark.slow
async def test_a_concurrent_burst_reconciles_to_the_fen(services: Services) -> None:
    """Concurrent authorize, capture, void, expiry and refund, drained: reconciliation reports
    no difference and the ledger's debits equal its credits; rebuilding Redis after losing its
    counters restores them exactly."""
    async with ledger_world(services, hold_ttl_s=1, sweep_interval_ms=50) as (env, _gateway, client):
        expected = await traffic(client, 40)
        # Holds left to expire: three units each, on serials that the expiry must release.
        people = [consumer_key() for _ in range(10)]
        for person in people:
            lines = [Line(str(index), AIR_CONDITIONER, 200_000, serial()) for index in range(3)]
            response = await client.authorize(campaign_id="c-main", consumer_key=person, lines=lines)
            assert response.decision == pb.DECISION_APPROVED
        expected += 20  # AUTHORIZED then EXPIRED
        owner, device = consumer_key(), serial()
        kept = await client.authorize(
            campaign_id="c-main", consumer_key=owner, lines=[Line("1", FRIDGE_G1, 300_000, device)]
        )
        await client.capture(kept.authorization_id)
        expected += 2
        await asyncio.sleep(1.6)
        with pytest.raises(InvalidState):
            await client.capture(response.authorization_id)
        redis = Redis.from_url(env.redis_url)
        writer = LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis)
        await writer.drain()
        await assert_ledger_matches(env, expected)
        before_loss = await redis_counters(redis, env.keys)
        # Lose every money counter in Redis, then rebuild them from the ledger.
        for pattern in ("usage", "serial", "budget", "auth", "holds"):
            doomed = [key async for key in redis.scan_iter(match=f"{env.keys.tag}:{pattern}*")]
            if doomed:
                await redis.delete(*doomed)
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            assert await reconcile(connection, redis, env.keys) != []
            # As after a real loss: re-publish the reference data, then rebuild the money state.
            await publish_reference(redis, env.keys, await fetch_reference(connection))
            await rebuild(connection, redis, env.keys)
            assert (await redis_counters(redis, env.keys)).nonzero() == before_loss.nonzero()
        finally:
            await connection.close()
        # The rebuilt state still enforces the limits: the captured fridge's owner and device are
        # refused; the consumers whose holds expired got their quota back.
        again = await client.authorize(
            campaign_id="c-main", consumer_key=owner, lines=[Line("1", FRIDGE_G1, 300_000, serial())]
        )
        assert again.decline_reason == pb.DECLINE_REASON_CONSUMER_LIMIT_REACHED
        same_device = await client.authorize(
            campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G1, 300_000, device)]
        )
        assert same_device.decline_reason == pb.DECLINE_REASON_SERIAL_ALREADY_SUBSIDISED
        returned = await client.authorize(
            campaign_id="c-main", consumer_key=people[0], lines=[Line("1", AIR_CONDITIONER, 200_000, serial())]
        )
        assert returned.decision == pb.DECISION_APPROVED
        await client.refund(kept.authorization_id)  # the rebuilt authorization is usable too
        await redis.aclose()


async def test_ledger_rows_are_append_only_and_tampering_is_detected(services: Services) -> None:
    """UPDATE, DELETE and TRUNCATE of ledger rows fail in the database itself; an entry altered
    behind the application's back (triggers bypassed by a superuser) is found by verify."""
    async with ledger_world(services) as (env, _gateway, client):
        await traffic(client, 4)
        redis = Redis.from_url(env.redis_url)
        await LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis).drain()
        await redis.aclose()
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            for statement in (
                "UPDATE ledger_entries SET debit_fen = debit_fen + 1 WHERE entry_seq = 3",
                "DELETE FROM ledger_entries WHERE entry_seq = 3",
                "TRUNCATE ledger_entries CASCADE",
                "UPDATE ledger_events SET amount_fen = 0",
                "DELETE FROM ledger_events",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await connection.execute(statement)
            assert (await verify(connection)).ok
            await connection.execute("SET session_replication_role = replica")  # bypasses triggers
            await connection.execute(
                "UPDATE ledger_entries SET debit_fen = debit_fen + 100 WHERE entry_seq = 3 AND debit_fen > 0"
            )
            await connection.execute("SET session_replication_role = origin")
            report = await verify(connection)
            assert not report.ok
            assert [(item.entry_seq, item.problem) for item in report.breaks] == [
                (3, "entry or its event does not match its hash (altered)")
            ]
            # An event's content is covered too: altering a line of an event breaks its entries.
            await connection.execute("SET session_replication_role = replica")
            await connection.execute(
                "UPDATE ledger_entries SET debit_fen = debit_fen - 100 WHERE entry_seq = 3 AND debit_fen > 0"
            )
            event_id = await connection.fetchval("SELECT event_id FROM ledger_entries WHERE entry_seq = 5")
            await connection.execute(
                "UPDATE ledger_events SET payload = jsonb_set(payload, '{consumer}', '\"someone-else\"')"
                " WHERE event_id = $1",
                event_id,
            )
            await connection.execute("SET session_replication_role = origin")
            assert [item.entry_seq for item in (await verify(connection)).breaks] == [5]
        finally:
            await connection.close()


async def test_lag_is_exposed_as_metrics_and_health(services: Services) -> None:
    """Stream length, backlog and the oldest unwritten event's age, on /metrics and /health."""
    async with ledger_world(services) as (env, _gateway, client):
        expected = await traffic(client, 4)
        redis = Redis.from_url(env.redis_url)
        writer = LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis)
        await writer.ensure_group()
        server = await serve_metrics(WriterMetrics(writer), "127.0.0.1:0")
        port = server.port

        async def get(path: str) -> str:
            reader, stream = await asyncio.open_connection("127.0.0.1", port)
            stream.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            body = (await reader.read()).decode()
            stream.close()
            return body

        await asyncio.sleep(0.2)
        before = await get("/metrics")
        assert f'subsidy_ledger_backlog{{prefix="{env.prefix}"}} {float(expected)}' in before
        assert f'subsidy_ledger_stream_length{{prefix="{env.prefix}"}} {float(expected)}' in before
        assert "subsidy_ledger_oldest_unwritten_age_seconds" in before
        health = await get("/health")
        assert '"backlog":' + str(expected) in health and '"status":"ok"' in health
        await writer.drain()
        after = await get("/metrics")
        assert f'subsidy_ledger_backlog{{prefix="{env.prefix}"}} 0.0' in after
        assert f'subsidy_ledger_events_written_total{{prefix="{env.prefix}"}} {float(expected)}' in after
        server.close()
        await redis.aclose()


async def test_a_request_id_reused_after_redis_forgot_it_is_caught(services: Services) -> None:
    """Redis keeps answers for a limited time; a request id that acts again after that is caught
    by the long-lived unique key in PostgreSQL and recorded for follow-up."""
    async with ledger_world(services, idempotency_ttl_s=1) as (env, _gateway, client):
        request_id = str(secrets.token_hex(16))
        request_id = (
            f"{request_id[:8]}-{request_id[8:12]}-4{request_id[13:16]}-8{request_id[17:20]}-{request_id[20:32]}"
        )
        lines = [Line("1", WASHER, 100_000)]
        first = await client.authorize(
            campaign_id="c-main", consumer_key=consumer_key(), lines=lines, request_id=request_id
        )
        await asyncio.sleep(1.5)
        second = await client.authorize(
            campaign_id="c-main", consumer_key=consumer_key(), lines=lines, request_id=request_id
        )
        assert not second.replayed and second.authorization_id != first.authorization_id
        redis = Redis.from_url(env.redis_url)
        writer = LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis)
        await writer.drain()
        await redis.aclose()
        assert writer.stats.reused_request_ids == 1
        connection = await asyncpg.connect(env.pg_dsn)
        try:
            row = await connection.fetchrow("SELECT * FROM duplicate_requests")
        finally:
            await connection.close()
        assert row is not None
        assert (row["authorization_id"], row["first_authorization_id"]) == (
            second.authorization_id,
            first.authorization_id,
        )


async def test_poison_events_go_to_the_dead_letter_stream(services: Services) -> None:
    """An entry that is not a ledger event, and one PostgreSQL keeps refusing, end in the
    dead-letter stream (the latter after max_deliveries attempts); the good events around them
    are written, and the dead-letter gauge rises."""
    async with ledger_world(services) as (env, _gateway, client):
        redis = Redis.from_url(env.redis_url)
        await redis.xadd(env.keys.ledger, {"e": "not json"})
        expected = await traffic(client, 2)
        # Well-formed, but PostgreSQL refuses it: a negative amount breaks a CHECK constraint.
        refused = await redis.xadd(
            env.keys.ledger,
            {
                "e": '{"type":"AUTHORIZED","authorization_id":"x","campaign":"c-main","merchant":"m","terminal":"t",'
                '"consumer":"c","amount_fen":-5,"at_ms":1,"lines":[]}'
            },
        )
        writer = LedgerWriter(
            WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix, max_deliveries=3), redis
        )
        await writer.drain()
        dead = await redis.xrange(writer.dead_letter_stream)
        assert [fields[b"reason"] for _, fields in dead] == [b"malformed event", b"CheckViolationError"]
        assert dead[1][1][b"source_id"] == refused
        assert writer.stats.dead_letters == 2
        assert (await lag(redis, env.keys, "ledger-writer")).dead_letters == 2
        await redis.aclose()
        assert await ledger_counts(env) == (expected, expected)


async def test_reporting_rpcs_reconcile_for_operators_only(services: Services) -> None:
    """ReportingService answers operator credentials: Reconcile lists no difference once the
    ledger has drained, then the exact difference after a Redis counter is altered; terminals
    (and suspended operators) are refused, and operators cannot authorize."""
    async with ledger_world(services) as (env, gateway, client):
        expected = await traffic(client, 6)
        target = f"127.0.0.1:{gateway.port}"
        operator = ReportingClient(
            target, "op-auditor", env.credentials["op-auditor"], retry=RetryPolicy(max_attempts=1)
        )
        status = await operator.get_ledger_status()
        assert (status.stream_length, status.undelivered) == (expected, expected)
        redis = Redis.from_url(env.redis_url)
        await LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis).drain()
        clean = await operator.reconcile()
        assert (list(clean.differences), clean.ledger_backlog) == ([], 0)
        await redis.hincrby(env.keys.budget("c-main"), "fridge:spent", 7)
        tampered = await operator.reconcile()
        assert [(item.kind, item.key, item.redis_value - item.ledger_value) for item in tampered.differences] == [
            ("budget", "c-main:fridge:spent", 7)
        ]
        await redis.aclose()
        with pytest.raises(PermissionDenied):
            await ReportingClient(target, "t-main-01", env.credentials["t-main-01"]).reconcile()
        with pytest.raises(Unauthenticated):
            await ReportingClient(target, "op-gone", env.credentials["op-gone"]).reconcile()
        as_terminal = AuthorizationClient(target, "op-auditor", env.credentials["op-auditor"])
        with pytest.raises(PermissionDenied):
            await as_terminal.authorize(
                campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", WASHER, 1000)]
            )
        await operator.close()


async def test_a_database_that_refuses_writes_is_an_outage_not_poison(services: Services) -> None:
    """PostgreSQL answering but refusing writes (a failover left it read-only) must not send
    valid events to the dead-letter stream: they stay pending until it accepts writes again."""
    async with ledger_world(services) as (env, _gateway, client):
        expected = await traffic(client, 3)
        separator = "&" if "?" in env.pg_dsn else "?"
        read_only = f"{env.pg_dsn}{separator}default_transaction_read_only=on"
        redis = Redis.from_url(env.redis_url)
        stuck = LedgerWriter(
            WriterConfig(pg_dsn=read_only, redis_url=env.redis_url, prefix=env.prefix, max_deliveries=2), redis
        )
        await stuck.ensure_group()
        for _ in range(6):
            await stuck.step(block=False)
        current = await lag(redis, env.keys, "ledger-writer")
        assert (current.dead_letters, current.backlog) == (0, expected)
        assert stuck.stats.postgres_failures >= 6
        await LedgerWriter(WriterConfig(pg_dsn=env.pg_dsn, redis_url=env.redis_url, prefix=env.prefix), redis).drain()
        await redis.aclose()
        await assert_ledger_matches(env, expected)
