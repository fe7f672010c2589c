"""subsidyctl dev: a development environment on this machine (server/commands/dev.py).

    subsidyctl dev run      # make run: PostgreSQL and Redis found or embedded, demo data, the gateway and a writer
    subsidyctl dev reset    # make reset: forget make run's data

``python -m server.dev [--reset]``, which make calls, is an alias of these two.
"""

from __future__ import annotations

import click

from server.commands.dev import start
from server.ctl.common import DEVELOPMENT


@click.group()
def dev() -> None:
    """The development environment of make run."""


@dev.command("run", short_help="make run: services, demo data, gateway and writer.")
def run_command() -> None:
    """make run: find or start PostgreSQL and Redis (embedded under .data/ when none answers),
    load examples/demo.yaml, serve on 127.0.0.1:50051 with a ledger writer until Ctrl-C."""
    raise click.exceptions.Exit(start(reset_only=False))


@dev.command("reset", short_help="make reset: forget make run's data.")
def reset_command() -> None:
    """make reset: drop make run's database (subsidy_dev) and Redis keys (prefix sg); .keys/ stays."""
    raise click.exceptions.Exit(start(reset_only=True))


SECTION = DEVELOPMENT
COMMANDS = (dev,)
