"""subsidyctl serve: the gateway (server/processes/gateway.py), configured by SUBSIDY_*
variables (README "Configuration"). ``python -m server`` is its alias (the image's command)."""

from __future__ import annotations

import click

from server.ctl.common import PROCESSES
from server.processes.dashboard import main as dashboard_main
from server.processes.gateway import main as gateway_main


@click.command(short_help="Run the gateway (SUBSIDY_* settings).")
def serve() -> None:
    """Run the gateway on SUBSIDY_LISTEN with SUBSIDY_WORKERS processes until SIGTERM or Ctrl-C
    (configuration from SUBSIDY_* variables; logs JSON lines on stderr)."""
    raise click.exceptions.Exit(gateway_main())


@click.command(short_help="Run the bureau's web dashboard (SUBSIDY_DASHBOARD_*).")
def dashboard() -> None:
    """Run the government dashboard on SUBSIDY_DASHBOARD_LISTEN until SIGTERM or Ctrl-C: a
    read-only web page for government credentials, calling the gateway (SUBSIDY_DASHBOARD_GATEWAY,
    default SUBSIDY_LISTEN) with each user's own credential (README "Government dashboard")."""
    raise click.exceptions.Exit(dashboard_main())


SECTION = PROCESSES
COMMANDS = (serve, dashboard)
