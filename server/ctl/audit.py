"""subsidyctl audit: the audit archive for the bureau's auditors (issue 12, section 4).

    subsidyctl audit export --from YYYY-MM-DD --to YYYY-MM-DD --out PATH [--json]

Reads PostgreSQL directly, like the ledger commands (SUBSIDY_PG_DSN; without it, what make run
recorded in .data/services.json), and writes a self-contained archive: a directory, or a .zip
when PATH ends in .zip (server/commands/audit.py says what is in it). The archive carries its
own verify.py (standard library only). Progress on stderr; a summary on stdout (JSON with
--json). Exit statuses: 0 written and verified, 1 written but its own verification found a
break, 2 a usage or configuration error, 3 PostgreSQL did not answer.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import click
import orjson

from server.commands.audit import export
from server.commands.common import (
    EXIT_PROBLEM,
    EXIT_USAGE,
    missing_pg_dsn,
    require_services,
    run_command,
    use_recorded_services,
)
from server.domain.daily_report import BusinessCalendar
from storage.devenv import PG_ENV

PROG = "subsidyctl audit export"
# Listed with the ledger tasks in `subsidyctl --help` (server/ctl/common.py: LOCAL).
SECTION = "On PostgreSQL and Redis (SUBSIDY_PG_DSN / SUBSIDY_REDIS_URL, or what make run recorded)"


@click.group()
def audit() -> None:
    """The audit archive: ledger, events, daily reports and operator actions of chosen days."""


def _day(_context: click.Context, _parameter: click.Parameter, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date YYYY-MM-DD") from None


def _json_requested(json_here: bool) -> bool:
    if json_here:
        return True
    root = click.get_current_context().find_root().obj
    return bool(getattr(root, "json_output", False))


def _progress(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@audit.command("export", short_help="Write a self-verifying audit archive of some days.")
@click.option("--from", "first", required=True, callback=_day, help="first business day, YYYY-MM-DD")
@click.option("--to", "last", required=True, callback=_day, help="last business day, YYYY-MM-DD (inclusive)")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="a new directory, or a file ending in .zip",
)
@click.option("--json", "json_here", is_flag=True, help="print the summary as JSON")
def export_command(first: date, last: date, out: Path, json_here: bool) -> None:
    """Write the archive of business days --from..--to (SUBSIDY_REPORT_TIMEZONE, default
    Asia/Shanghai): ledger entries and events with each campaign's hash chain, the published
    daily reports, operator actions, a manifest (chain heads, totals, every file's SHA-256) and
    verify.py, which checks it all with the Python standard library alone:
    `python3 verify.py` in the archive's directory, or `python3 verify.py ARCHIVE.zip`."""
    as_json = _json_requested(json_here)
    if last < first:
        raise click.UsageError(f"--to {last} is before --from {first}")
    if out.exists():
        raise click.UsageError(f"{out} exists already: give a new path")
    try:
        calendar = BusinessCalendar(os.environ.get("SUBSIDY_REPORT_TIMEZONE") or "Asia/Shanghai")
    except ValueError as error:
        print(f"{PROG}: SUBSIDY_REPORT_TIMEZONE: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    recorded = use_recorded_services()
    dsn = os.environ.get(PG_ENV, "").strip()
    if not dsn:
        print(missing_pg_dsn(PROG), file=sys.stderr)
        sys.exit(EXIT_USAGE)

    async def work() -> dict[str, Any]:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            return await export(connection, first, last, out, calendar, _progress)
        finally:
            await connection.close()

    summary: dict[str, Any] = {}

    def body() -> int:
        require_services(pg_dsn=dsn, redis_url=None, recorded=recorded)
        summary.update(asyncio.run(work()))
        return 0 if summary["ok"] else EXIT_PROBLEM

    status = run_command(PROG, body)
    if summary:
        if as_json:
            click.echo(orjson.dumps(summary, option=orjson.OPT_SORT_KEYS).decode())
        else:
            files = ", ".join(f"{rows} {name}" for name, rows in summary["files"].items())
            click.echo(f"{summary['kind']} {summary['archive']}: {summary['from']}..{summary['to']}: {files}")
            for campaign, chain in summary["chains"].items():
                click.echo(
                    f"  chain {campaign}: entries {chain['first_seq']}..{chain['last_seq']},"
                    f" head {chain['last_hash']} (ledger head {chain['ledger_head_seq']})"
                )
            click.echo(summary["verification"])
    sys.exit(status)


COMMANDS = (audit,)
