"""subsidyctl reference: load reference data into PostgreSQL and publish it to Redis.

    subsidyctl reference load FILE [--credentials-out FILE]
    subsidyctl reference publish

On PostgreSQL and Redis directly, like ``subsidyctl ledger``; the work is in
server/commands/reference.py; ``python -m server.reference`` is an alias of
``subsidyctl --json reference``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from server.commands.reference import load, publish
from server.ctl.common import (
    LOCAL,
    ConfigurationError,
    check_services,
    emit_document,
    guarded,
    json_option,
    local_config,
)
from server.domain.reference import ReferenceError


@click.group()
def reference() -> None:
    """Reference data: campaigns, products, merchants, operators, partners."""


@reference.command("load", short_help="Load a reference file into PostgreSQL and publish it.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--credentials-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write the callers' issued secrets here (mode 0600)",
)
@json_option
def load_command(file: Path, credentials_out: Path | None) -> None:
    """Validate a YAML or JSON reference FILE, upsert it into PostgreSQL in one transaction and
    publish everything to Redis."""
    config, recorded = local_config()
    check_services(config, recorded)
    try:
        version = guarded(lambda: asyncio.run(load(config, file, credentials_out)))
    except ReferenceError as error:
        raise ConfigurationError(f"invalid reference data: {error}") from None
    emit_document({"file": str(file), "reference_version": version})


@reference.command("publish", short_help="Rebuild Redis's reference cache from PostgreSQL.")
@json_option
def publish_command() -> None:
    """Rebuild the whole Redis reference cache from PostgreSQL (after a Redis loss, before
    `subsidyctl ledger rebuild`)."""
    config, recorded = local_config()
    check_services(config, recorded)
    version = guarded(lambda: asyncio.run(publish(config)))
    emit_document({"reference_version": version})


SECTION = LOCAL
COMMANDS = (reference,)
