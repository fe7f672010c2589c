"""subsidyctl: the operator's command line over the gateway's operator services.

    subsidyctl [--target HOST:PORT] [--credentials FILE] [--operator ID] [--json] COMMAND ...

Each command group lives in its own module and is added to ``main`` below.
"""

from __future__ import annotations

from pathlib import Path

import click

from server.ctl.common import DEFAULT_CREDENTIALS, Options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", help="gateway host:port (default: from the credentials file, or 127.0.0.1:50051)")
@click.option(
    "--credentials",
    type=click.Path(path_type=Path),
    default=DEFAULT_CREDENTIALS,
    show_default=True,
    help="credentials file with an 'operators' section (written by make run)",
)
@click.option("--operator", help="operator id (default: SUBSIDYCTL_OPERATOR, or the file's first operator)")
@click.option("--json", "json_output", is_flag=True, help="print JSON instead of a table")
@click.pass_context
def main(
    context: click.Context, target: str | None, credentials: Path, operator: str | None, json_output: bool
) -> None:
    """Operate the subsidy gateway: campaigns, the catalog, merchants, budgets."""
    context.obj = Options(target, credentials, operator, json_output)


# Command groups, one module each (imported after ``main`` exists).
from server.ctl import campaign, catalog, certs, merchant  # noqa: E402

main.add_command(campaign.campaign)
main.add_command(campaign.budget)
main.add_command(catalog.catalog)
main.add_command(merchant.merchant)
main.add_command(certs.dev_certs)

# The T+1 daily reports (server/ctl/report.py).
from server.ctl import report  # noqa: E402

main.add_command(report.report)

# The audit archive (server/ctl/audit.py).
from server.ctl import audit  # noqa: E402

main.add_command(audit.audit)
