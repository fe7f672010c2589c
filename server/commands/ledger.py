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
services ``make run`` recorded in .data/services.json (server/commands/common.py); a service that does
not answer is one line on stderr and exit status 3 (``lag`` needs only Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from server import logs
from server.commands.common import EXIT_USAGE, missing_pg_dsn, require_services, run_command, use_recorded_services
from server.commands.exchange import reapply
from server.config import Config, ConfigError
from server.processes.writer import run_writer
from storage.postgres.audit import rebuild, reconcile, verify
from storage.postgres.qualifications import mirror_backlog, restore_qualifications
from storage.postgres.writer import lag
from storage.redis.keys import Keys
from storage.redis.store import requeue_set_aside, sweep_backlog

PROG = "python -m server.ledger"


async def redis_lag(config: Config) -> dict[str, Any]:
    """The backlogs, from Redis alone: lag answers while PostgreSQL is away (when it matters)."""
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    keys = Keys(config.redis_prefix)
    try:
        ledger = dataclasses.asdict(await lag(redis, keys, "ledger-writer"))
        qualification_backlog, qualification_dead_letters = await mirror_backlog(redis, keys)
        return {
            **ledger,
            "qualification_backlog": qualification_backlog,
            "qualification_dead_letters": qualification_dead_letters,
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
        unmirrored = sum(await mirror_backlog(redis, keys))
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
