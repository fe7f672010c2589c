"""Ledger commands: ``python -m server.ledger writer|verify|reconcile|rebuild|lag``.

- ``writer``: runs the ledger writer until SIGTERM/SIGINT, serving ``/metrics`` (Prometheus) and
  ``/health`` (JSON lag details) on SUBSIDY_WRITER_METRICS_LISTEN when set. The same process
  republishes reference changes whose publication failed after commit, and mirrors
  qualifications into PostgreSQL (storage/postgres/qualifications.py).
- ``verify``: recomputes the hash chains; exit status 1 at the first break.
- ``reconcile``: Redis counters against the ledger, and the sweepers' backlog (holds and
  qualifications overdue by more than a minute, or set aside because their expiry failed);
  exit status 1 on any difference or backlog.
- ``rebuild``: restores Redis counters from the ledger, qualifications from their mirror and
  other providers' reports from theirs (after a Redis loss); refuses while either stream still
  holds unwritten entries unless ``--force``.
- ``lag``: the stream backlog, the qualification mirror's (entries not yet mirrored and
  dead-lettered) and the sweepers' (overdue, set aside), as JSON.
- ``requeue-set-aside``: puts set-aside holds and qualifications back on their schedule, due
  now, once the defect that made their expiry fail is fixed (an item failing again is set
  aside again).

Every command prints JSON on stdout. Without SUBSIDY_PG_DSN / SUBSIDY_REDIS_URL they use the
services ``make run`` recorded in .data/services.json (server/commands.py); a service that does
not answer is one line on stderr and exit status 3 (``lag`` needs only Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import ssl
import sys
from typing import Any

import asyncpg
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from redis.asyncio import Redis

from server import logs
from server.commands import EXIT_USAGE, missing_pg_dsn, require_services, run_command, use_recorded_services
from server.config import Config, ConfigError
from server.exchange import reapply
from server.tls import metrics_tls
from storage.postgres.audit import rebuild, reconcile, verify
from storage.postgres.migrate import migrate
from storage.postgres.qualifications import QualificationMirror, restore_qualifications
from storage.postgres.writer import LedgerWriter, WriterConfig, lag
from storage.redis.keys import Keys
from storage.redis.store import requeue_set_aside, sweep_backlog

log = logging.getLogger("subsidy.ledger")
PROG = "python -m server.ledger"


def writer_config(config: Config) -> WriterConfig:
    return WriterConfig(
        pg_dsn=config.pg_dsn,
        redis_url=config.redis_url,
        prefix=config.redis_prefix,
        consumer=config.writer_consumer,
        batch_size=config.writer_batch_size,
        block_ms=config.writer_block_ms,
        claim_idle_ms=config.writer_claim_idle_ms,
        max_deliveries=config.writer_max_deliveries,
        crash_at=config.writer_crash_at,
        crash_after_batches=config.writer_crash_after_batches,
    )


class WriterMetrics:
    """Prometheus gauges and counters of the writer, refreshed from Redis on each scrape."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer
        self.registry = CollectorRegistry()
        labels = ["prefix"]
        self.stream_length = Gauge(
            "subsidy_ledger_stream_length", "Entries in the ledger stream", labels, registry=self.registry
        )
        self.backlog = Gauge(
            "subsidy_ledger_backlog", "Events not yet written to PostgreSQL", labels, registry=self.registry
        )
        self.oldest_age = Gauge(
            "subsidy_ledger_oldest_unwritten_age_seconds",
            "Age of the oldest unwritten event",
            labels,
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "subsidy_ledger_dead_letters",
            "Entries in the dead-letter stream (alert when > 0)",
            labels,
            registry=self.registry,
        )
        self.written = Counter(
            "subsidy_ledger_events_written", "Events written to PostgreSQL", labels, registry=self.registry
        )
        self.overdue = Gauge(
            "subsidy_sweeper_overdue",
            "Holds / qualifications past expiry by more than a minute and not yet expired (alert when > 0)",
            [*labels, "kind"],
            registry=self.registry,
        )
        self.set_aside = Gauge(
            "subsidy_sweeper_set_aside",
            "Holds / qualifications whose expiry failed and were set aside (alert when > 0)",
            [*labels, "kind"],
            registry=self.registry,
        )
        self._written_seen = 0

    async def snapshot(self) -> dict[str, Any]:
        current = await lag(self.writer.redis, self.writer.keys, self.writer.config.group)
        prefix = self.writer.config.prefix
        self.stream_length.labels(prefix).set(current.stream_length)
        self.backlog.labels(prefix).set(current.backlog)
        self.oldest_age.labels(prefix).set(current.oldest_unwritten_age_s)
        self.dead_letters.labels(prefix).set(current.dead_letters)
        self.written.labels(prefix).inc(self.writer.stats.events_written - self._written_seen)
        self._written_seen = self.writer.stats.events_written
        sweeper = await sweep_backlog(self.writer.redis, self.writer.keys)
        self.overdue.labels(prefix, "hold").set(sweeper.overdue_holds)
        self.overdue.labels(prefix, "qualification").set(sweeper.overdue_qualifications)
        self.set_aside.labels(prefix, "hold").set(sweeper.set_aside_holds)
        self.set_aside.labels(prefix, "qualification").set(sweeper.set_aside_qualifications)
        return {
            **dataclasses.asdict(current),
            "backlog": current.backlog,
            "sweeper": dataclasses.asdict(sweeper),
            "stats": dataclasses.asdict(self.writer.stats),
        }


async def serve_metrics(
    metrics: WriterMetrics, listen: str, ssl_context: ssl.SSLContext | None = None
) -> asyncio.Server:
    """A minimal HTTP endpoint: GET /metrics (Prometheus text) and GET /health (JSON); HTTPS
    with ``ssl_context`` (server.tls: the gateway's certificate, TLS 1.2+, reloaded with it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await asyncio.wait_for(reader.readline(), 5)).decode(errors="replace")
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = request_line.split(" ")[1] if " " in request_line else "/"
            details = await metrics.snapshot()
            if path == "/metrics":
                status, kind, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
            elif path == "/health":
                sweeper = details["sweeper"]
                healthy = details["dead_letters"] == 0 and not any(sweeper.values())
                status = "200 OK" if healthy else "503 Service Unavailable"
                kind, body = "application/json", orjson.dumps({"status": "ok" if healthy else "degraded", **details})
            else:
                status, kind, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            writer.write((head + "Connection: close\r\n\r\n").encode() + body)
            await writer.drain()
        except (Exception, asyncio.CancelledError):  # a bad scrape must not stop the writer
            log.warning("metrics request failed", exc_info=True)
        finally:
            writer.close()

    host, port = listen.rsplit(":", 1)
    return await asyncio.start_server(handle, host, int(port), ssl=ssl_context)


async def run_writer(config: Config) -> None:
    redis = Redis.from_url(config.redis_url, socket_timeout=10)
    connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    writer = LedgerWriter(writer_config(config), redis)
    # Qualifications are not money: their own stream and consumer group, in this same process.
    mirror = QualificationMirror(
        redis,
        Keys(config.redis_prefix),
        config.pg_dsn,
        consumer=config.writer_consumer,
        block_ms=config.writer_block_ms,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = (
        await serve_metrics(WriterMetrics(writer), config.writer_metrics_listen, metrics_tls(config))
        if config.writer_metrics_listen
        else None
    )
    mirroring = asyncio.create_task(mirror.run(stopping))
    try:
        await writer.run(stopping)
    finally:
        stopping.set()
        await asyncio.gather(mirroring, return_exceptions=True)
        if server is not None:
            server.close()
        await redis.aclose()


async def redis_lag(config: Config) -> dict[str, Any]:
    """The backlogs, from Redis alone: lag answers while PostgreSQL is away (when it matters)."""
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    keys = Keys(config.redis_prefix)
    try:
        return {
            **dataclasses.asdict(await lag(redis, keys, "ledger-writer")),
            "qualification_backlog": await redis.xlen(keys.qualification_events),
            "qualification_dead_letters": await redis.xlen(keys.qualification_events + ":dead"),
            "sweeper": dataclasses.asdict(await sweep_backlog(redis, keys)),
        }
    finally:
        await redis.aclose()


async def with_connections(config: Config, action: str, force: bool) -> tuple[int, Any]:
    if action == "lag":
        return 0, await redis_lag(config)
    if action == "requeue-set-aside":
        client = Redis.from_url(config.redis_url, socket_timeout=30)
        try:
            return 0, {"requeued": await requeue_set_aside(client, Keys(config.redis_prefix))}
        finally:
            await client.aclose()
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    keys = Keys(config.redis_prefix)
    try:
        connection = await asyncpg.connect(config.pg_dsn, timeout=10)
    except BaseException:
        await redis.aclose()
        raise
    try:
        if action == "verify":
            report = await verify(connection)
            return (0 if report.ok else 1), dataclasses.asdict(report)
        if action == "reconcile":
            differences = await reconcile(connection, redis, keys)
            # Work the sweepers have not done is a difference too: a hold past its expiry still
            # reserves budget, quota and serials the ledger will release.
            sweeper = await sweep_backlog(redis, keys)
            return (1 if differences or sweeper.total else 0), {
                "differences": [dataclasses.asdict(item) for item in differences],
                "sweeper": dataclasses.asdict(sweeper),
            }
        current = await lag(redis, keys, "ledger-writer")
        # Dead-lettered snapshots count too: rebuilding from rows they should have updated would
        # restore stale states.
        unmirrored = await redis.xlen(keys.qualification_events) + await redis.xlen(keys.qualification_events + ":dead")
        if (current.backlog or current.dead_letters or unmirrored) and not force:
            problem = (
                f"{current.backlog} events are not yet written, {current.dead_letters} are dead-lettered"
                f" and {unmirrored} qualification changes are not yet mirrored"
            )
            return 2, {"error": problem + "; drain the writer and resolve dead letters first, or use --force"}
        counters = await rebuild(connection, redis, keys)
        qualifications = await restore_qualifications(connection, redis, keys)
        # The rebuild drops every serial key; other providers' reports come back from their table.
        pool = await asyncpg.create_pool(config.pg_dsn, min_size=1, max_size=1)
        try:
            imported = await reapply(pool, redis, keys)
        finally:
            await pool.close()
        return 0, {
            "budget_counters": len(counters.budget),
            "usage_counters": len(counters.usage),
            "serials": len(counters.serials),
            "qualifications": qualifications,
            "imported_consumers": imported.consumers,
            "imported_serials": imported.serials,
        }
    finally:
        await connection.close()
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("writer", help="run the ledger writer")
    commands.add_parser("verify", help="recompute the hash chains")
    commands.add_parser("reconcile", help="compare Redis counters with the ledger")
    rebuild_parser = commands.add_parser("rebuild", help="restore Redis counters from the ledger")
    rebuild_parser.add_argument("--force", action="store_true", help="rebuild although events are unwritten")
    commands.add_parser("lag", help="the stream backlog and the sweepers' overdue and set-aside work")
    commands.add_parser(
        "requeue-set-aside", help="put set-aside holds and qualifications back on their sweeper's schedule"
    )
    arguments = parser.parse_args()
    recorded = use_recorded_services()
    try:
        config = Config.from_env()
    except ConfigError as error:
        print(f"{PROG}: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if arguments.command not in ("lag", "requeue-set-aside") and not config.pg_dsn:
        print(missing_pg_dsn(PROG), file=sys.stderr)
        return EXIT_USAGE
    logs.configure(config.log_level)
    force = getattr(arguments, "force", False)
    return run_command(PROG, lambda: run(config, arguments.command, force, recorded))


def run(config: Config, command: str, force: bool, recorded: dict[str, str]) -> int:
    """One command, after checking that the services it needs answer (lag needs only Redis)."""
    require_services(
        pg_dsn=None if command in ("lag", "requeue-set-aside") else config.pg_dsn,
        redis_url=config.redis_url,
        recorded=recorded,
    )
    if command == "writer":
        try:
            asyncio.run(run_writer(config))
        except ConfigError as error:
            print(f"{PROG}: configuration error: {error}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    status, result = asyncio.run(with_connections(config, command, force))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return status


if __name__ == "__main__":
    sys.exit(main())
