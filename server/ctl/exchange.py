"""subsidyctl exchange: the daily cross-provider files (docs/exchange.md).

    subsidyctl exchange export [--date YYYY-MM-DD] [--output FILE | -]
    subsidyctl exchange import FILE...
    subsidyctl exchange reapply

On PostgreSQL and Redis directly, like ``subsidyctl ledger``; SUBSIDY_PROVIDER_ID (ours,
written into exported files) and SUBSIDY_EXCHANGE_KEY (shared with the other providers) as
for the server. The work is in server/commands/exchange.py; ``python -m server.exchange`` is
an alias of ``subsidyctl --json exchange``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from server.commands.exchange import UsageError, previous_day, run_export, run_import, run_reapply
from server.ctl.common import (
    LOCAL,
    ConfigurationError,
    check_services,
    emit_document,
    finding,
    guarded,
    json_option,
    local_config,
    options,
    steps,
)


@click.group()
def exchange() -> None:
    """Daily signed files of consumer keys and serials exchanged with the other providers."""


def _prepared() -> Any:
    config, recorded = local_config()
    check_services(config, recorded)
    return config


@exchange.command(short_help="Write our signed file of one day.")
@click.option(
    "--date", "moment", type=click.DateTime(["%Y-%m-%d"]), help="the day (China Standard Time); default yesterday"
)
@click.option("--output", "-o", help="file to write, - for stdout; default <provider>-<date>.jsonl")
@json_option
def export(moment: datetime | None, output: str | None) -> None:
    """Write our signed file of one day: the consumers and serials of the payments captured
    that day and not refunded (run after the day ended and the ledger writer caught up)."""
    config = _prepared()
    day = moment.date() if moment else previous_day()
    try:
        result = guarded(lambda: asyncio.run(run_export(config, day, output)))
    except UsageError as error:
        raise ConfigurationError(str(error)) from None
    if output == "-":
        # stdout holds the file itself: the summary goes to stderr.
        if options().json_output:
            click.echo(json.dumps(result, ensure_ascii=False, indent=2), err=True)
        else:
            click.echo(f"exported {result.get('consumers')} consumers and {result.get('serials')} serials", err=True)
        return
    emit_document(result)


@exchange.command("import", short_help="Verify and import other providers' files.")
@click.argument("files", type=click.Path(exists=True, dir_okay=False, path_type=Path), nargs=-1, required=True)
@json_option
def import_files(files: tuple[Path, ...]) -> None:
    """Verify and import other providers' files, each on its own: a rejected file (exit status
    1) imports nothing, the others still go in. A progress bar per file."""
    config = _prepared()
    with steps() as progress:
        try:
            status, results = guarded(lambda: asyncio.run(run_import(config, files, progress.reporter)))
        except UsageError as error:
            raise ConfigurationError(str(error)) from None
    emit_document(results)
    finding(status != 0)


@exchange.command(short_help="Rewrite Redis from every imported record.")
@json_option
def reapply() -> None:
    """Rewrite Redis from every record imported so far (after a Redis loss; `subsidyctl ledger
    rebuild` does it too)."""
    config = _prepared()
    with steps() as progress:
        result = guarded(lambda: asyncio.run(run_reapply(config, progress.reporter("imported records"))))
    emit_document(result)


SECTION = LOCAL
COMMANDS = (exchange,)
