"""subsidyctl ledger: the fund ledger in PostgreSQL and what Redis holds of it.

    subsidyctl ledger verify | reconcile | rebuild [--force] | lag | requeue-set-aside | writer

They talk to PostgreSQL and Redis directly (SUBSIDY_PG_DSN, SUBSIDY_REDIS_URL and
SUBSIDY_REDIS_PREFIX as for the server; without the first two, what make run recorded in
.data/services.json), not to the gateway. ``lag`` and ``requeue-set-aside`` need only Redis,
so they answer while PostgreSQL is away. The work itself is in server/commands/ledger.py;
``python -m server.ledger`` is an alias of ``subsidyctl --json ledger``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from server import logs
from server.commands.common import EXIT_USAGE
from server.commands.ledger import REDIS_ONLY, with_connections
from server.config import ConfigError
from server.ctl.common import (
    LOCAL,
    ConfigurationError,
    check_services,
    emit_document,
    finding,
    guarded,
    json_option,
    local_config,
    steps,
)
from server.processes.writer import run_writer


@click.group()
def ledger() -> None:
    """The fund ledger: verify, reconcile, rebuild, lag; the ledger writer."""


def _run(action: str, force: bool = False) -> None:
    needs_pg = action not in REDIS_ONLY
    config, recorded = local_config(needs_pg=needs_pg)
    logs.configure(config.log_level)
    check_services(config, recorded, needs_pg=needs_pg)
    with steps() as progress:
        status, result = guarded(lambda: asyncio.run(with_connections(config, action, force, step=progress.reporter)))
    if status == EXIT_USAGE:
        raise ConfigurationError(f"{action} refused: {result['error']}")
    emit_document(_shown(action, result))
    finding(status != 0)


def _shown(action: str, result: Any) -> Any:
    """The table's order: what to look at first (JSON keeps every field as it is)."""
    if action == "lag" and isinstance(result, dict) and "backlog" in result:
        return {"backlog": result["backlog"], **result}
    return result


@ledger.command(short_help="Recompute the hash chains, check debits = credits.")
@json_option
def verify() -> None:
    """Recompute every hash chain and check debits = credits (a break: exit status 1)."""
    _run("verify")


@ledger.command(short_help="Redis counters against the ledger and the mirror; backlogs, dead letters.")
@json_option
def reconcile() -> None:
    """Compare Redis budget, usage and serial counters with the ledger's sums and the
    qualification and voucher-pack counters with the qualification mirror, and report the
    sweepers' overdue and set-aside work and the backlog and dead letters of the stream
    consumers (qualification mirror, risk events) and, with SUBSIDY_REDIS_CLUSTER_NODES, of the
    Redis Cluster's shard streams (any difference, sweeper backlog or dead letter, or shard
    streams that cannot be read: exit status 1). With SUBSIDY_REDIS_SHARDS too (mode "consumer
    shards"), the counters compared are the sum of the consumer shards' (money, qualification
    quotas, holders), and each shard's ledger, qualification and risk event streams' backlog and
    dead letters are findings (shard_ledgers, shard_qualification_mirrors, shard_risk_events,
    shard_sweepers)."""
    _run("reconcile")


@ledger.command(short_help="Restore Redis from the ledger after a Redis loss.")
@click.option("--force", is_flag=True, help="rebuild although events or qualification changes are unwritten")
@json_option
def rebuild(force: bool) -> None:
    """After a Redis loss (run `subsidyctl reference publish` first): restore budget counters,
    usage, serials, authorizations and holds from the ledger, qualifications from their mirror
    and other providers' records; refused (exit status 2) while the streams hold unwritten
    entries. A progress bar per step."""
    _run("rebuild", force)


@ledger.command(short_help="The backlog of the ledger stream, the other streams and the sweepers.")
@json_option
def lag() -> None:
    """The ledger stream's backlog (events not yet in PostgreSQL), dead letters, the
    qualification mirror's and the risk event writer's backlog and dead letters, with
    SUBSIDY_REDIS_CLUSTER_NODES the shard streams' (shard_streams: streams, backlog,
    dead_letters, or the error when the cluster cannot be read), with SUBSIDY_REDIS_SHARDS each
    consumer shard's ledger, qualification and risk event streams (shard_ledgers,
    shard_qualification_mirrors, shard_risk_events), and the sweepers' (one Redis only)."""
    _run("lag")


@ledger.command("requeue-set-aside", short_help="Put set-aside holds and qualifications back on schedule.")
@json_option
def requeue_set_aside() -> None:
    """Put set-aside holds and qualifications back on their sweeper's schedule, due now, once
    the defect that made their expiry fail is fixed (Redis only)."""
    _run("requeue-set-aside")


@ledger.command(short_help="Run the ledger writer (stream into PostgreSQL, /metrics).")
def writer() -> None:
    """Run the ledger writer until SIGTERM or Ctrl-C: the ledger stream into PostgreSQL, the
    qualification mirror, failed publications; /metrics and /health on
    SUBSIDY_WRITER_METRICS_LISTEN. Logs JSON lines on stderr."""
    config, recorded = local_config()
    logs.configure(config.log_level)
    check_services(config, recorded)
    try:
        guarded(lambda: asyncio.run(run_writer(config)))
    except ConfigError as error:
        raise ConfigurationError(f"configuration error: {error}") from None


SECTION = LOCAL
COMMANDS = (ledger,)
